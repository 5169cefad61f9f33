#!/usr/bin/env python3
"""PyTorch CUDA figures beside fedquic's wgpu bench_train: the same two models (see
bench/pytorch_reference.py), eager fp32, plain SGD lr 0.05, random MNIST-shaped data
resident on the GPU; train = forward + cross-entropy + backward + step, infer = forward
under no_grad. Each row: steps for ~0.6 s after warm-up, torch.cuda.synchronize()
around the timed loop; samples/s."""
import time
import torch
from torch import nn

torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = torch.device("cuda")
print("torch", torch.__version__, torch.cuda.get_device_name(0), "tf32 off, fp32")

def build(name):
    if name == "mlp:784-200-200-10":
        return nn.Sequential(nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10))
    return nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(3136, 512), nn.ReLU(), nn.Linear(512, 10))

def timed(step, batches, seconds=0.6):
    for i in range(5):
        step(*batches[i % len(batches)])
    torch.cuda.synchronize()
    steps, start = 0, time.perf_counter()
    while True:
        for _ in range(20):
            step(*batches[steps % len(batches)])
            steps += 1
        torch.cuda.synchronize()
        if time.perf_counter() - start > seconds:
            return steps, time.perf_counter() - start

for name in ["mlp:784-200-200-10", "cnn:mnist"]:
    model = build(name).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    shape = (784,) if name.startswith("mlp") else (1, 28, 28)
    for batch in (10, 64, 256):
        xs = torch.rand((64, batch, *shape), device=dev)
        ys = torch.randint(0, 10, (64, batch), device=dev)
        batches = [(xs[i], ys[i]) for i in range(64)]
        def train(x, y):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        steps, secs = timed(train, batches)
        print(f"{name:<22} train {batch:>5} {steps * batch / secs:>12.0f} samples/s")
        model.eval()
        def infer(x, y):
            with torch.no_grad():
                model(x)
        steps, secs = timed(infer, batches)
        print(f"{name:<22} infer {batch:>5} {steps * batch / secs:>12.0f} samples/s")
        model.train()
