//! `bench-overhead`: the framework's own cost per round, with training
//! replaced by adding a fixed delta.
#[derive(clap::Args, Debug)]
pub struct OverheadArgs {}
#[derive(clap::Args, Debug)]
pub struct ServeArgs {}
pub fn run_overhead(_a: OverheadArgs) -> anyhow::Result<()> {
    anyhow::bail!("todo")
}
pub fn serve(_a: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("todo")
}
