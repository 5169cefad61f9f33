use fedquic_protocol::*;
use proptest::prelude::*;

fn all_messages() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            versions: vec![1, 2],
            codecs: vec![Codec::F32],
            agent: "test/0.1".into(),
            backend: "wgpu".into(),
        }),
        Message::Welcome(Welcome {
            version: 1,
            uplink: Codec::F32,
            downlink: Codec::F32,
            model_spec: "mlp:784-200-200-10".into(),
            client_name: "client-001".into(),
            run: "run-1".into(),
        }),
        Message::FitTask(FitTask {
            round: 7,
            task_id: 99,
            config: FitInstructions {
                epochs: 2,
                batch_size: 10,
                learning_rate: 0.05,
                proximal_mu: 0.0,
                seed: 42,
                optimizer: Default::default(),
            },
            initial_loss: true,
            scaffold: Some(fedquic_protocol::ScaffoldTask {
                run: "68f0-00ab".into(),
            }),
            secagg: Some(fedquic_protocol::SecAggTask {
                clip_norm: 5.0,
                weight_cap: 1000,
                bound: 5.0,
                max_contributors: 100,
                noise: fedquic_protocol::ClientNoise::Skellam { mu: 1e9 },
            }),
        }),
        Message::EvaluateTask(EvaluateTask {
            round: 3,
            task_id: 4,
        }),
        Message::EvalResult(EvalResult {
            round: 3,
            task_id: 4,
            examples: 100,
            loss: 0.5,
            accuracy: 0.9,
        }),
        Message::TaskFailed {
            task_id: 5,
            reason: "no data".into(),
        },
        Message::UpdateAccepted { task_id: 6 },
        Message::UpdateRejected {
            task_id: 6,
            reason: "stale".into(),
        },
        Message::Wait { round: 2 },
        Message::Reject(Reject {
            reason: "full".into(),
            retry_after_ms: Some(1000),
        }),
        Message::Reject(Reject {
            reason: "revoked".into(),
            retry_after_ms: None,
        }),
        Message::Heartbeat,
        Message::Bye {
            reason: "done".into(),
            finished: true,
        },
    ]
}

#[test]
fn every_message_round_trips_through_a_frame() {
    for msg in all_messages() {
        let frame = encode_message(&msg).unwrap();
        let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        assert_eq!(decode_message(&frame[4..]).unwrap(), msg);
    }
}

#[test]
fn frame_decoder_reassembles_byte_by_byte() {
    let msgs = all_messages();
    let stream: Vec<u8> = msgs
        .iter()
        .flat_map(|m| encode_message(m).unwrap())
        .collect();
    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    for b in &stream {
        dec.push(std::slice::from_ref(b)).unwrap();
        while let Some(m) = dec.next_message().unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got, msgs);
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn oversized_and_empty_frames_are_refused_before_allocation() {
    let huge = (MAX_CONTROL_FRAME as u32 + 1).to_le_bytes();
    assert!(matches!(
        frame_len(huge),
        Err(ProtocolError::FrameTooLarge { .. })
    ));
    assert_eq!(frame_len([0; 4]), Err(ProtocolError::EmptyFrame));
    let mut dec = FrameDecoder::new();
    assert!(dec.push(&u32::MAX.to_le_bytes()).is_err());
}

#[test]
fn trailing_bytes_and_unknown_tags_are_errors() {
    let mut frame = encode_message(&Message::Heartbeat).unwrap();
    frame.push(0);
    assert!(matches!(
        decode_message(&frame[4..]),
        Err(ProtocolError::TrailingBytes { trailing: 1 })
    ));
    assert!(matches!(
        decode_message(&[200]),
        Err(ProtocolError::Malformed(_))
    ));
}

#[test]
fn version_negotiation_picks_a_common_version_or_fails() {
    assert_eq!(negotiate_version(&[4]).unwrap(), 4);
    assert_eq!(negotiate_version(&[9, 4, 3, 2, 1]).unwrap(), 4);
    // Version 1 peers (before q-FedAvg and SCAFFOLD grew FitTask), version 2
    // peers (before codecs grew Welcome) and version 3 peers (before secure
    // aggregation grew FitTask) are refused.
    for old in [1, 2, 3] {
        assert!(matches!(
            negotiate_version(&[old]),
            Err(ProtocolError::NoCommonVersion { .. })
        ));
    }
    assert!(matches!(
        negotiate_version(&[5]),
        Err(ProtocolError::NoCommonVersion { .. })
    ));
    assert!(negotiate_version(&[]).is_err());
}

#[test]
fn fit_instructions_are_validated() {
    let ok = FitInstructions {
        epochs: 1,
        batch_size: 10,
        learning_rate: 0.1,
        proximal_mu: 0.0,
        seed: 1,
        optimizer: Default::default(),
    };
    assert!(ok.validate().is_ok());
    for bad in [
        FitInstructions {
            epochs: 0,
            ..ok.clone()
        },
        FitInstructions {
            batch_size: 0,
            ..ok.clone()
        },
        FitInstructions {
            learning_rate: f32::NAN,
            ..ok.clone()
        },
        FitInstructions {
            learning_rate: -1.0,
            ..ok.clone()
        },
        FitInstructions {
            proximal_mu: f32::INFINITY,
            ..ok.clone()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

fn sample_header(values: &[f32]) -> TensorHeader {
    TensorHeader {
        kind: StreamKind::Update,
        round: 3,
        task_id: 17,
        codec: Codec::F32,
        tensors: vec![
            TensorMeta::f32("dense0.weight", &[2, 3]),
            TensorMeta::f32("dense0.bias", &[values.len() - 6]),
        ],
        num_examples: 120,
        metrics: vec![("loss".into(), 0.25), ("accuracy".into(), 0.75)],
        body_len: values.len() as u64 * 4,
    }
}

fn encode_stream(header: &TensorHeader, values: &[f32]) -> Vec<u8> {
    let mut bytes = encode_header(header).unwrap();
    encode_f32_body(values, &mut bytes);
    bytes
}

#[test]
fn tensor_stream_round_trips() {
    let values: Vec<f32> = (0..8).map(|i| i as f32 * 0.5 - 1.0).collect();
    let header = sample_header(&values);
    let bytes = encode_stream(&header, &values);
    let (h, v) = decode_tensor_stream(&bytes, &TensorLimits::default()).unwrap();
    assert_eq!(h, header);
    assert_eq!(v, values);
    h.check_layout(&header.tensors).unwrap();
    let other = vec![
        TensorMeta::f32("dense0.weight", &[3, 2]),
        TensorMeta::f32("dense0.bias", &[2]),
    ];
    assert!(matches!(
        h.check_layout(&other),
        Err(ProtocolError::LayoutMismatch(_))
    ));
}

#[test]
fn body_decoder_handles_chunks_that_split_floats() {
    let values: Vec<f32> = (0..1000).map(|i| (i as f32).sin()).collect();
    let mut header = sample_header(&values);
    header.tensors = vec![TensorMeta::f32("w", &[10, 100])];
    let mut body = Vec::new();
    encode_f32_body(&values, &mut body);
    for chunk in [1, 3, 5, 7, 4, 4096] {
        let mut dec = BodyDecoder::new(&header);
        let mut out = vec![0f32; dec.values()];
        for c in body.chunks(chunk) {
            dec.push(c, &mut out).unwrap();
        }
        dec.finish().unwrap();
        assert_eq!(out, values);
    }
}

#[test]
fn body_decoder_rejects_non_finite_overrun_and_truncation() {
    let values = vec![1.0, 2.0, f32::NAN, 4.0, 5.0, 6.0, 7.0, 8.0];
    let header = sample_header(&values);
    let mut body = Vec::new();
    encode_f32_body(&values, &mut body);
    let mut dec = BodyDecoder::new(&header);
    let mut out = vec![0f32; 8];
    assert_eq!(
        dec.push(&body, &mut out),
        Err(ProtocolError::NonFinite { index: 2 })
    );

    let good = [1.0f32; 8];
    let mut body = Vec::new();
    encode_f32_body(&good, &mut body);
    let mut dec = BodyDecoder::new(&header);
    dec.push(&body[..10], &mut out).unwrap();
    assert!(matches!(
        dec.finish(),
        Err(ProtocolError::BodyTruncated {
            got: 10,
            declared: 32
        })
    ));
    assert!(matches!(
        dec.push(&body, &mut out),
        Err(ProtocolError::BodyOverrun { .. })
    ));
    let mut small = vec![0f32; 2];
    assert!(matches!(
        BodyDecoder::new(&header).push(&body, &mut small),
        Err(ProtocolError::OutputTooSmall { .. })
    ));
}

#[test]
fn header_validation_enforces_limits() {
    let values = [0f32; 8];
    let mut header = sample_header(&values);
    let limits = TensorLimits::for_model(8);
    header.body_len = 31;
    assert!(matches!(
        decode_header(&encode_header(&header).unwrap()[8..], &limits),
        Err(ProtocolError::BodyLengthMismatch { .. })
    ));
    let header = sample_header(&[0f32; 9]);
    assert!(matches!(
        decode_header(&encode_header(&header).unwrap()[8..], &limits),
        Err(ProtocolError::TooManyValues { values: 9, max: 8 })
    ));
    let mut header = sample_header(&values);
    header.tensors[0].shape = vec![u64::MAX, 2];
    assert!(decode_header(&encode_header(&header).unwrap()[8..], &limits).is_err());
    let mut header = sample_header(&values);
    header.tensors[0].shape = vec![0, 6];
    assert!(decode_header(&encode_header(&header).unwrap()[8..], &limits).is_err());
    let mut header = sample_header(&values);
    header.metrics.push(("loss".into(), f64::INFINITY));
    assert!(decode_header(&encode_header(&header).unwrap()[8..], &limits).is_err());

    let mut prefix = [0u8; 8];
    prefix[..4].copy_from_slice(b"NOPE");
    assert!(matches!(
        header_len_from_prefix(&prefix, &limits),
        Err(ProtocolError::BadMagic { .. })
    ));
    prefix[..4].copy_from_slice(&TENSOR_STREAM_MAGIC);
    prefix[4..].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        header_len_from_prefix(&prefix, &limits),
        Err(ProtocolError::HeaderTooLarge { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic_the_control_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_message(&bytes);
        let mut dec = FrameDecoder::new();
        if dec.push(&bytes).is_ok() {
            while let Ok(Some(_)) = dec.next_message() {}
        }
    }

    #[test]
    fn random_bytes_never_panic_the_tensor_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_tensor_stream(&bytes, &TensorLimits::for_model(64));
        let mut with_magic = TENSOR_STREAM_MAGIC.to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = decode_tensor_stream(&with_magic, &TensorLimits::for_model(64));
    }

    #[test]
    fn truncated_and_corrupted_streams_are_errors_not_panics(
        cut in 0usize..200, flip in 0usize..200, bit in 0u8..8, chunk in 1usize..17
    ) {
        let values: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let mut header = sample_header(&values);
        header.tensors = vec![TensorMeta::f32("w", &[4, 4])];
        let bytes = encode_stream(&header, &values);
        let cut = cut.min(bytes.len());
        if cut < bytes.len() {
            prop_assert!(decode_tensor_stream(&bytes[..cut], &TensorLimits::for_model(16)).is_err());
        }
        let mut corrupt = bytes.clone();
        let i = flip % corrupt.len();
        corrupt[i] ^= 1 << bit;
        let _ = decode_tensor_stream(&corrupt, &TensorLimits::for_model(16));
        // Chunked decoding agrees with whole-buffer decoding.
        let body_start = bytes.len() - 64;
        let mut dec = BodyDecoder::new(&header);
        let mut out = vec![0f32; 16];
        for c in bytes[body_start..].chunks(chunk) { dec.push(c, &mut out).unwrap(); }
        prop_assert!(dec.finish().is_ok());
        prop_assert_eq!(out, values);
    }

    #[test]
    fn arbitrary_messages_round_trip(round in any::<u64>(), task in any::<u64>(), reason in ".{0,64}", lr in 1e-6f32..10.0) {
        for msg in [
            Message::FitTask(FitTask { round, task_id: task, config: FitInstructions { epochs: 1, batch_size: 32, learning_rate: lr, proximal_mu: 0.0, seed: round, optimizer: Default::default() }, initial_loss: round % 2 == 0, scaffold: None, secagg: None }),
            Message::UpdateRejected { task_id: task, reason: reason.clone() },
            Message::Reject(Reject { reason: reason.clone(), retry_after_ms: Some(round) }),
        ] {
            let frame = encode_message(&msg).unwrap();
            prop_assert_eq!(decode_message(&frame[4..]).unwrap(), msg);
        }
    }
}

#[test]
fn hello_backend_is_validated() {
    let hello = |backend: &str| Hello {
        versions: vec![1],
        codecs: vec![Codec::F32],
        agent: "test".into(),
        backend: backend.into(),
    };
    assert!(hello("cpu").validate().is_ok());
    assert!(hello("wgpu").validate().is_ok());
    for bad in [
        "",
        "GPU",
        "wgpu\n",
        "a b",
        &"x".repeat(Hello::MAX_BACKEND_LEN + 1),
    ] {
        let error = hello(bad).validate().unwrap_err().to_string();
        assert!(error.contains("backend"), "{bad:?}: {error}");
    }
}

#[test]
fn first_non_finite_finds_the_first_bad_value_anywhere() {
    assert_eq!(first_non_finite(&[]), None);
    let clean: Vec<f32> = (0..5000).map(|i| i as f32 * 0.5 - 100.0).collect();
    assert_eq!(first_non_finite(&clean), None);
    // Block edges (1024 values), both infinities and NaN, and a later second one.
    for index in [0, 1, 1023, 1024, 1025, 2047, 4999] {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut values = clean.clone();
            values[index] = bad;
            if index + 7 < values.len() {
                values[index + 7] = f32::NAN;
            }
            assert_eq!(first_non_finite(&values), Some(index), "{bad} at {index}");
        }
    }
    // Largest finite and subnormal values are finite.
    assert_eq!(
        first_non_finite(&[f32::MAX, f32::MIN, f32::MIN_POSITIVE / 2.0]),
        None
    );
}

#[test]
fn a_welcome_naming_ring32_or_an_excessive_skellam_mu_is_refused() {
    let welcome = |uplink, downlink| Welcome {
        version: 1,
        uplink,
        downlink,
        model_spec: "mlp:784-200-200-10".into(),
        client_name: "client-001".into(),
        run: "run-1".into(),
    };
    let offered = all_codecs();
    welcome(Codec::F32, Codec::F16).validate(&offered).unwrap();
    for (up, down) in [(Codec::Ring32, Codec::F32), (Codec::F32, Codec::Ring32)] {
        let err = welcome(up, down).validate(&[Codec::F32, Codec::Ring32]);
        assert!(err.unwrap_err().to_string().contains("ring32"));
    }
    // Past the clients' Poisson sampler's largest mean: refused up front, not
    // after training.
    let task = |mu| SecAggTask {
        clip_norm: 5.0,
        weight_cap: 1000,
        bound: 5.0,
        max_contributors: 100,
        noise: ClientNoise::Skellam { mu },
    };
    task(1e15).validate().unwrap();
    assert!(task(1e16).validate().is_err());
}
