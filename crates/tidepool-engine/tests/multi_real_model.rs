//! Real-model tests of the pooled engine (`tidepool_engine::multi`) on SmolLM2-135M-Instruct
//! and Gemma-3-270M from `~/.cache/tidepool/models`.
//!
//! Method: greedy decoding is deterministic, so a sequence that is saved out of its context
//! (and restored into another slot, or after its model was evicted and loaded again) must
//! produce exactly the text of the same sequence run straight through.

use std::path::PathBuf;

use tidepool_core::{ModelId, RequestId};
use tidepool_engine::multi::{Accelerator, ModelFrontEnd, MultiModelConfig};
use tidepool_engine::{ChatMessage, GenerateRequest, Generation, GenerationEvent, SamplingParams};

fn models_dir() -> PathBuf {
    tidepool_core::config::default_models_dir()
}

#[expect(
    clippy::unwrap_used,
    reason = "a test helper fails its test by panicking"
)]
fn config(id: &str, file: &str) -> MultiModelConfig {
    let mut config = MultiModelConfig::new(ModelId::new(id).unwrap(), models_dir().join(file));
    config.context_tokens = 512;
    config.seqs_max = 4;
    config.threads = 2;
    config.batch_tokens_max = 256;
    config
}

fn smollm2() -> MultiModelConfig {
    config("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn gemma() -> MultiModelConfig {
    config("gemma", "gemma-3-270m-q4_k_m.gguf")
}

#[expect(
    clippy::unwrap_used,
    reason = "a test helper fails its test by panicking"
)]
fn request(front: &ModelFrontEnd, user: &str, max_tokens: u32) -> GenerateRequest {
    let text = if front.model_id().as_str() == "gemma" {
        user.to_owned()
    } else {
        front
            .apply_chat_template(&[ChatMessage {
                role: "user".to_owned(),
                content: user.to_owned(),
            }])
            .unwrap()
    };
    GenerateRequest {
        remote: None,
        request_id: RequestId::new(),
        prompt: front.tokenize(&text).unwrap(),
        params: SamplingParams {
            temperature: 0.0,
            max_tokens,
            ..SamplingParams::default()
        },
        class: tidepool_engine::RequestClass::Online,
    }
}

/// Everything the sequence sent: its text and its completion token count.
#[expect(clippy::panic, reason = "a test helper fails its test by panicking")]
fn collect(mut generation: Generation) -> (String, u32) {
    let mut text = String::new();
    loop {
        match generation.events.try_recv() {
            Ok(GenerationEvent::Chunk { text: piece, .. }) => text.push_str(&piece),
            Ok(GenerationEvent::Done {
                completion_tokens, ..
            }) => return (text, completion_tokens),
            Ok(GenerationEvent::Failed(error)) => panic!("generation failed: {error}"),
            Err(error) => panic!("generation did not finish: {error}"),
        }
    }
}

/// Runs sequence `seq` straight through: prefill, then decode until it finishes.
fn run_straight(accelerator: &mut Accelerator, model: usize, seq: u64) {
    let outcome = accelerator.prefill(model, &[seq], &[]);
    if outcome.finished.is_empty() {
        let outcome = accelerator.decode(model, &[seq], 1000);
        assert_eq!(outcome.finished.len(), 1, "the sequence finishes");
    }
}

/// The sea prompt: a model with `config` loaded on a fresh accelerator, and its 48-token
/// greedy answer run straight through (sequence 1) with its completion token count.
#[expect(
    clippy::unwrap_used,
    reason = "a test helper fails its test by panicking"
)]
fn reference(config: &MultiModelConfig) -> (ModelFrontEnd, Accelerator, String, u32) {
    let front = ModelFrontEnd::open(config.clone()).unwrap();
    let mut accelerator = Accelerator::new(vec![config.clone()]).unwrap();
    accelerator.load(0).unwrap();
    let (prepared, reference) = front.prepare(request(&front, PROMPT, 48)).unwrap();
    accelerator.register(1, 0, prepared, None);
    run_straight(&mut accelerator, 0, 1);
    let (expected, expected_tokens) = collect(reference);
    (front, accelerator, expected, expected_tokens)
}

const PROMPT: &str = "Write three sentences about the sea.";

/// `generation` sent exactly the reference text and token count; `what` changed it otherwise.
fn assert_same_output(
    config: &MultiModelConfig,
    generation: Generation,
    (expected, expected_tokens): (&str, u32),
    what: &str,
) {
    let (text, tokens) = collect(generation);
    assert_eq!(
        text, expected,
        "{}: {what} changed the output",
        config.model_id
    );
    assert_eq!(
        tokens, expected_tokens,
        "{}: {what} changed the length",
        config.model_id
    );
}

#[test]
fn real_model_saved_sequence_continues_exactly_in_another_slot_and_after_reload() {
    for config in [smollm2(), gemma()] {
        let (front, mut accelerator, expected, expected_tokens) = reference(&config);
        assert!(
            expected_tokens > 12,
            "{}: a long enough answer",
            config.model_id
        );

        // Preempted twice: saved and restored into another slot while a second sequence holds
        // the first slot, then saved, the model evicted and loaded again, and restored.
        let (prepared, preempted) = front.prepare(request(&front, PROMPT, 48)).unwrap();
        accelerator.register(2, 0, prepared, None);
        let outcome = accelerator.prefill(0, &[2], &[]);
        assert!(outcome.finished.is_empty());
        let outcome = accelerator.decode(0, &[2], 5);
        assert_eq!((outcome.steps, outcome.finished.len()), (5, 0));
        let bytes = accelerator.save(2);
        assert!(
            bytes > 1000,
            "a saved state holds the KV of its tokens ({bytes} bytes)"
        );

        let (prepared, other) = front.prepare(request(&front, "Name a colour.", 4)).unwrap();
        accelerator.register(3, 0, prepared, None);
        let outcome = accelerator.prefill(0, &[3], &[]);
        assert!(
            outcome.finished.is_empty(),
            "the other sequence holds a slot"
        );
        accelerator.restore(2);
        let outcome = accelerator.decode(0, &[2], 5);
        assert_eq!((outcome.steps, outcome.finished.len()), (5, 0));
        accelerator.save(2);
        accelerator.evict(0);
        assert!(!accelerator.is_loaded(0));
        accelerator.load(0).unwrap();
        accelerator.restore(2);
        let outcome = accelerator.decode(0, &[2], 1000);
        assert_eq!(outcome.finished.len(), 1);
        assert_eq!(outcome.finished.first().map(|f| f.seq), Some(2));
        assert_same_output(
            &config,
            preempted,
            (&expected, expected_tokens),
            "preemption",
        );
        drop(other);
        accelerator.release(3);
        assert_eq!(accelerator.seqs_len(), 0);
    }
}

/// A decoding sequence that rides in other requests' prefill batches (one token each time)
/// produces exactly the text it produces decoding alone, and a rider that reaches its
/// `max_tokens` in a prefill is reported finished there.
#[test]
fn real_model_riders_in_prefill_batches_keep_their_output() {
    for config in [smollm2(), gemma()] {
        let (front, mut accelerator, expected, expected_tokens) = reference(&config);

        let (prepared, rider) = front.prepare(request(&front, PROMPT, 48)).unwrap();
        accelerator.register(2, 0, prepared, None);
        assert!(accelerator.prefill(0, &[2], &[]).finished.is_empty());
        let mut others = Vec::new();
        for (seq, user) in [(3, "Name a colour."), (4, "Count to five."), (5, "Say hi.")] {
            let (prepared, other) = front.prepare(request(&front, user, 2)).unwrap();
            accelerator.register(seq, 0, prepared, None);
            let outcome = accelerator.prefill(0, &[seq], &[2]);
            assert_eq!(outcome.steps, 1);
            assert!(outcome.finished.is_empty(), "{outcome:?}");
            // The newcomer decodes its second (last) token beside the rider, then rides in
            // the next prefill... here it simply finishes with a one-step decode.
            let outcome = accelerator.decode(0, &[seq, 2], 1);
            assert_eq!(
                outcome.finished.iter().map(|f| f.seq).collect::<Vec<_>>(),
                vec![seq]
            );
            others.push(other);
        }
        // A rider at its last token finishes inside the prefill.
        let (prepared, short) = front.prepare(request(&front, "Name a fruit.", 2)).unwrap();
        accelerator.register(6, 0, prepared, None);
        assert!(accelerator.prefill(0, &[6], &[]).finished.is_empty());
        let (prepared, other) = front.prepare(request(&front, "Name a tree.", 2)).unwrap();
        accelerator.register(7, 0, prepared, None);
        let outcome = accelerator.prefill(0, &[7], &[6, 2]);
        let finished: Vec<(u64, u32)> = outcome
            .finished
            .iter()
            .map(|f| (f.seq, f.tokens_emitted))
            .collect();
        assert_eq!(finished, vec![(6, 2)], "the short rider ends at 2 tokens");
        assert_eq!(collect(short).1, 2);
        others.push(other);
        accelerator.decode(0, &[7], 1);

        let outcome = accelerator.decode(0, &[2], 1000);
        assert_eq!(outcome.finished.first().map(|f| f.seq), Some(2));
        assert_same_output(&config, rider, (&expected, expected_tokens), "riding");
        for other in others {
            assert_eq!(collect(other).1, 2);
        }
        assert_eq!(accelerator.seqs_len(), 0);
    }
}

#[test]
fn real_model_calibration_measures_sizes_and_costs() {
    let mut accelerator = Accelerator::new(vec![smollm2(), gemma()]).unwrap();
    for model in 0..2 {
        let calibration = accelerator.calibrate(model).unwrap();
        assert!(!accelerator.is_loaded(model), "calibration unloads again");
        // Q4 weights of 135M / 270M parameters: tens to hundreds of MB.
        assert!(
            (20_000_000..1_000_000_000).contains(&calibration.weights_bytes),
            "{calibration:?}"
        );
        // F16 K and V of a few hundred KV channels per layer: KB per token.
        assert!(
            (1_000..200_000).contains(&calibration.kv_bytes_per_token),
            "{calibration:?}"
        );
        assert!(calibration.ctx_bytes > 512 * 4 * calibration.kv_bytes_per_token);
        assert!(calibration.load_ns > 0 && calibration.decode_step_ns > 0);
        assert!(calibration.prefill_ns_per_token > 0);
        // The phases add up to the load, and the context's bytes to KV plus the measured extra.
        let phases = calibration.phases;
        assert_eq!(phases.weights_ns + phases.context_ns, calibration.load_ns);
        assert!(phases.repack_ns <= phases.weights_ns, "{calibration:?}");
        assert!(phases.kv_state_bytes > 0 && phases.kv_save_ns > 0 && phases.kv_restore_ns > 0);
        assert_eq!(
            calibration.ctx_bytes,
            calibration.ctx_kv_bytes + calibration.ctx_extra_bytes
        );
        // The process's resident memory grew by at least the KV cells the context cleared.
        assert!(
            calibration.memory.after_context_bytes > 512 * 4 * calibration.kv_bytes_per_token,
            "{calibration:?}"
        );
    }
}

/// The phases of a switch and the resident memory a model adds, for `docs/pool.md` ("What a
/// switch costs"): both models at the benchmark's context (512 tokens × 4 sequences) and the
/// shipped configuration's (2,048 × 16 SmolLM2, 2,048 × 8 Gemma), batch 512, three calibrations
/// each. Run by hand: `cargo nextest run -p tidepool-engine --run-ignored only switch_phases`.
#[test]
#[ignore = "a measurement, not a check: prints a table"]
#[expect(
    clippy::cast_precision_loss,
    reason = "milliseconds and MiB for a printed table"
)]
fn real_model_switch_phases_table() {
    let shapes = [(512, 4, 4), (2048, 16, 8)];
    eprintln!(
        "| model | context | weights ms (repack) | context ms | first step ms | evict ms | KV save / restore ms (128-token state KB) | RSS MiB weights / +context / +steps | KV+logits MiB | extra MiB |"
    );
    for (context_tokens, smollm2_seqs, gemma_seqs) in shapes {
        for (base, seqs) in [(smollm2(), smollm2_seqs), (gemma(), gemma_seqs)] {
            let mut config = base;
            config.context_tokens = context_tokens;
            config.seqs_max = seqs;
            config.batch_tokens_max = 512;
            let mut accelerator = Accelerator::new(vec![config.clone()]).unwrap();
            let mut runs: Vec<_> = (0..3).map(|_| accelerator.calibrate(0).unwrap()).collect();
            runs.sort_by_key(|c| c.load_ns);
            let c = runs[1];
            let p = c.phases;
            let ms = |ns: u64| ns as f64 / 1e6;
            let mib = |b: u64| b as f64 / 1_048_576.0;
            eprintln!(
                "| {} | {context_tokens} × {seqs} | {:.1} ({:.1}) | {:.1} | {:.1} | {:.1} | {:.2} / {:.2} ({}) | {:.0} / {:.0} / {:.0} | {:.0} | {:.0} |",
                config.model_id,
                ms(p.weights_ns),
                ms(p.repack_ns),
                ms(p.context_ns),
                ms(p.first_step_ns),
                ms(p.evict_ns),
                ms(p.kv_save_ns),
                ms(p.kv_restore_ns),
                p.kv_state_bytes / 1024,
                mib(c.memory.after_weights_bytes),
                mib(c.memory.after_context_bytes),
                mib(c.memory.after_steps_bytes),
                mib(c.ctx_kv_bytes),
                mib(c.ctx_extra_bytes),
            );
            eprintln!("  weights {} MiB; runs: {runs:?}", mib(c.weights_bytes));
        }
    }
}

#[test]
fn real_model_client_gone_is_reported_once_and_released() {
    let config = smollm2();
    let front = ModelFrontEnd::open(config.clone()).unwrap();
    let mut accelerator = Accelerator::new(vec![config]).unwrap();
    accelerator.load(0).unwrap();
    let (prepared, generation) = front.prepare(request(&front, "Count to ten.", 64)).unwrap();
    accelerator.register(7, 0, prepared, None);
    accelerator.prefill(0, &[7], &[]);
    drop(generation);
    assert_eq!(accelerator.cancelled(), vec![7]);
    assert!(accelerator.cancelled().is_empty(), "reported once");
    // A decode that still lists it reports it finished instead of decoding it.
    let outcome = accelerator.decode(0, &[7], 8);
    assert_eq!(outcome.steps, 0);
    assert_eq!(outcome.finished.len(), 1);
    assert_eq!(accelerator.seqs_len(), 0);
}

/// A decode batch handed over in any order (here the reverse of the slots) runs in slot order,
/// the order llama.cpp needs to put a batch with a KV stream per sequence into one
/// micro-batch; every sequence still gets exactly its own tokens.
#[test]
fn real_model_batch_in_reverse_slot_order_keeps_each_output() {
    let config = smollm2();
    let (front, mut accelerator, expected, expected_tokens) = reference(&config);
    let seqs = [11_u64, 12, 13, 14];
    let mut generations = Vec::new();
    for &seq in &seqs {
        let (prepared, generation) = front.prepare(request(&front, PROMPT, 48)).unwrap();
        accelerator.register(seq, 0, prepared, None);
        generations.push(generation);
    }
    // Slots 0..3 in request order; the decode asks for them the other way round.
    assert!(accelerator.prefill(0, &seqs, &[]).finished.is_empty());
    let reversed: Vec<u64> = seqs.iter().rev().copied().collect();
    let outcome = accelerator.decode(0, &reversed, 1000);
    assert_eq!(outcome.finished.len(), seqs.len(), "{outcome:?}");
    for generation in generations {
        assert_same_output(
            &config,
            generation,
            (&expected, expected_tokens),
            "a batch in reverse slot order",
        );
    }
    assert_eq!(accelerator.seqs_len(), 0);
}

/// A system prompt of about 600 tokens (SmolLM2's tokenizer), the same every time.
#[expect(clippy::format_collect, reason = "26 short lines, built once per test")]
fn long_system_prompt() -> String {
    let rules: String = (1..=26)
        .map(|rule| {
            format!(
                "Rule {rule}: boats in berth {rule} leave before the tide turns and report their cargo.\n"
            )
        })
        .collect();
    format!("You are the harbour master's assistant. Rules follow.\n{rules}")
}

/// A chat request with the long system prompt and `user`.
#[expect(
    clippy::unwrap_used,
    reason = "a test helper fails its test by panicking"
)]
fn system_request(front: &ModelFrontEnd, system: &str, user: &str) -> GenerateRequest {
    let messages = [
        ChatMessage {
            role: "system".to_owned(),
            content: system.to_owned(),
        },
        ChatMessage {
            role: "user".to_owned(),
            content: user.to_owned(),
        },
    ];
    let text = if front.model_id().as_str() == "gemma" {
        format!("{system}\n{user}")
    } else {
        front.apply_chat_template(&messages).unwrap()
    };
    GenerateRequest {
        remote: None,
        request_id: RequestId::new(),
        prompt: front.tokenize(&text).unwrap(),
        params: SamplingParams {
            temperature: 0.0,
            max_tokens: 24,
            ..SamplingParams::default()
        },
        class: tidepool_engine::RequestClass::Online,
    }
}

/// Text, completion tokens and cached prompt tokens of a finished generation.
#[expect(clippy::panic, reason = "a test helper fails its test by panicking")]
fn collect_cached(mut generation: Generation) -> (String, u32, u32, u32) {
    let mut text = String::new();
    loop {
        match generation.events.try_recv() {
            Ok(GenerationEvent::Chunk { text: piece, .. }) => text.push_str(&piece),
            Ok(GenerationEvent::Done {
                completion_tokens,
                prompt_tokens,
                cached_prompt_tokens,
                ..
            }) => {
                let cached = cached_prompt_tokens.unwrap_or(u32::MAX);
                return (text, completion_tokens, prompt_tokens, cached);
            }
            Ok(GenerationEvent::Failed(error)) => panic!("generation failed: {error}"),
            Err(error) => panic!("generation did not finish: {error}"),
        }
    }
}

/// Runs `request` as sequence `seq` straight through on `accelerator`.
#[expect(
    clippy::unwrap_used,
    reason = "a test helper fails its test by panicking"
)]
fn run_one(
    front: &ModelFrontEnd,
    accelerator: &mut Accelerator,
    seq: u64,
    request: GenerateRequest,
) -> (String, u32, u32, u32) {
    let (prepared, generation) = front.prepare(request).unwrap();
    accelerator.register(seq, 0, prepared, None);
    run_straight(accelerator, 0, seq);
    collect_cached(generation)
}

/// Prefix reuse in the pooled engine: a finished sequence leaves its KV in its slot, and a
/// later prompt with the same prefix prefills only the rest. Greedy output with and without the
/// cache hit is identical; the reused count is reported; a bound of 0 turns reuse off.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: cold runs, warm runs, then reuse turned off"
)]
fn real_model_prefix_reuse_keeps_output_and_reports_cached_tokens() {
    let mut config = smollm2();
    config.context_tokens = 1024;
    let system = long_system_prompt();
    let front = ModelFrontEnd::open(config.clone()).unwrap();
    let questions = ["Which berth leaves first?", "What must boats report?"];
    // Without reuse: a fresh accelerator per question.
    let mut cold = Vec::new();
    for question in questions {
        let mut accelerator = Accelerator::new(vec![config.clone()]).unwrap();
        accelerator.load(0).unwrap();
        let outcome = run_one(
            &front,
            &mut accelerator,
            1,
            system_request(&front, &system, question),
        );
        assert_eq!(outcome.3, 0, "a cold context has nothing to reuse");
        cold.push(outcome);
    }
    let prompt_tokens = cold[0].2;
    assert!(
        (550..=800).contains(&prompt_tokens),
        "a ~600-token prompt ({prompt_tokens})"
    );
    // One warm accelerator: the same request again, then the other question.
    let mut accelerator = Accelerator::new(vec![config.clone()]).unwrap();
    accelerator.load(0).unwrap();
    let first = run_one(
        &front,
        &mut accelerator,
        1,
        system_request(&front, &system, questions[0]),
    );
    assert_eq!(first, cold[0]);
    let again = run_one(
        &front,
        &mut accelerator,
        2,
        system_request(&front, &system, questions[0]),
    );
    assert_eq!(again.3, prompt_tokens - 1, "all but the last token reused");
    assert_eq!(
        (&again.0, again.1, again.2),
        (&cold[0].0, cold[0].1, cold[0].2)
    );
    let other = run_one(
        &front,
        &mut accelerator,
        3,
        system_request(&front, &system, questions[1]),
    );
    assert!(
        other.3 > prompt_tokens / 2 && other.3 < other.2,
        "the system prompt is reused, the question is not ({other:?})"
    );
    assert_eq!(
        (&other.0, other.1, other.2),
        (&cold[1].0, cold[1].1, cold[1].2)
    );
    assert!(!cold[0].0.is_empty() && cold[0].0 != cold[1].0);

    // Bound 0: nothing is kept.
    let mut off = config.clone();
    off.prefix_cache_tokens_max = 0;
    let mut accelerator = Accelerator::new(vec![off]).unwrap();
    accelerator.load(0).unwrap();
    run_one(
        &front,
        &mut accelerator,
        1,
        system_request(&front, &system, questions[0]),
    );
    let again = run_one(
        &front,
        &mut accelerator,
        2,
        system_request(&front, &system, questions[0]),
    );
    assert_eq!(again.3, 0);
    assert_eq!(again.0, cold[0].0);
}

/// Gemma-3 has sliding-window attention (512 tokens): a prefix is reused only while the kept
/// sequence is inside the window, and the output stays the same either way.
#[test]
fn real_model_prefix_reuse_stays_inside_a_sliding_window() {
    let mut config = gemma();
    config.context_tokens = 1024;
    let front = ModelFrontEnd::open(config.clone()).unwrap();
    let short = "The harbour has ten berths and one crane. Boats report their cargo.";
    let long = long_system_prompt();
    for (system, reused) in [(short, true), (long.as_str(), false)] {
        let mut cold_acc = Accelerator::new(vec![config.clone()]).unwrap();
        cold_acc.load(0).unwrap();
        let cold = run_one(
            &front,
            &mut cold_acc,
            1,
            system_request(&front, system, "Which berth?"),
        );
        let mut accelerator = Accelerator::new(vec![config.clone()]).unwrap();
        accelerator.load(0).unwrap();
        run_one(
            &front,
            &mut accelerator,
            1,
            system_request(&front, system, "Which berth?"),
        );
        let again = run_one(
            &front,
            &mut accelerator,
            2,
            system_request(&front, system, "Which berth?"),
        );
        assert_eq!(again.3 > 0, reused, "{system:.20}: {again:?}");
        assert_eq!((&again.0, again.1), (&cold.0, cold.1));
    }
}

/// Tokens two prompts share from their start (at most all but the last of `b`).
#[expect(
    clippy::unwrap_used,
    reason = "a test helper fails its test by panicking"
)]
fn shared(a: &[tidepool_engine::TokenId], b: &[tidepool_engine::TokenId]) -> u32 {
    let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    u32::try_from(common.min(b.len() - 1)).unwrap()
}

/// Text, completion tokens, prompt tokens and cached prompt tokens of one answer.
type Answer = (String, u32, u32, u32);

/// `questions` with `system` on a fresh accelerator of `config`, in one schedule: the first
/// `together` in one prefill, two decode steps, then the rest in a second prefill while the
/// first decode, then all to the end. Each answer with its prompt's tokens.
#[expect(
    clippy::unwrap_used,
    reason = "a test helper fails its test by panicking"
)]
fn concurrent_runs(
    config: &MultiModelConfig,
    front: &ModelFrontEnd,
    system: &str,
    questions: &[&str],
    together: usize,
) -> Vec<(Answer, Vec<tidepool_engine::TokenId>)> {
    let mut accelerator = Accelerator::new(vec![config.clone()]).unwrap();
    accelerator.load(0).unwrap();
    let mut runs = Vec::new();
    for (seq, question) in (1..).zip(questions) {
        let request = system_request(front, system, question);
        let prompt = request.prompt.clone();
        let (prepared, generation) = front.prepare(request).unwrap();
        accelerator.register(seq, 0, prepared, None);
        runs.push((generation, prompt));
    }
    let seqs: Vec<u64> = (1..).take(questions.len()).collect();
    let (first, later) = seqs.split_at(together);
    assert!(
        accelerator.prefill(0, first, &[]).finished.is_empty(),
        "nothing ends in its prefill"
    );
    if !later.is_empty() {
        assert_eq!(accelerator.decode(0, first, 2).steps, 2, "two steps");
        assert!(
            accelerator.prefill(0, later, &[]).finished.is_empty(),
            "nothing ends in its prefill"
        );
    }
    let outcome = accelerator.decode(0, &seqs, 1000);
    assert_eq!(
        outcome.finished.len(),
        seqs.len(),
        "every sequence finishes"
    );
    runs.into_iter()
        .map(|(generation, prompt)| (collect_cached(generation), prompt))
        .collect()
}

/// Concurrent prompts that share a system prompt compute it once: in one prefill the first
/// computes it and the others copy its KV into their own slots, and a prompt arriving while
/// others decode copies from a busy slot. Each reports exactly the prefix it shares with the
/// earlier prompts as cached; with reuse off nothing is. (Outputs are compared in the next test:
/// here the batches differ between the two runs, and llama.cpp's CPU kernels round differently
/// for different batch shapes.)
#[test]
fn real_model_concurrent_prompts_copy_a_shared_prefix_once() {
    let mut config = smollm2();
    config.context_tokens = 1024;
    let mut off = config.clone();
    off.prefix_cache_tokens_max = 0;
    let system = long_system_prompt();
    let front = ModelFrontEnd::open(config.clone()).unwrap();
    let questions = [
        "Which berth leaves first?",
        "What must boats report?",
        "When does the tide turn?",
        "Who is the harbour master?",
    ];
    // Three in one prefill (the system prompt spans three batches of 256 tokens); the fourth
    // arrives while they decode.
    let reference = concurrent_runs(&off, &front, &system, &questions, 3);
    let copied = concurrent_runs(&config, &front, &system, &questions, 3);
    for (index, ((on, prompt), (off, _))) in copied.iter().zip(&reference).enumerate() {
        assert_eq!(off.3, 0, "reuse off: nothing cached");
        assert_eq!(on.2, off.2, "the same prompt");
        assert!(on.1 > 0 && !on.0.is_empty(), "question {index} is answered");
        let expected = copied
            .get(..index)
            .unwrap()
            .iter()
            .map(|(_, earlier)| shared(earlier, prompt))
            .max()
            .unwrap_or(0);
        assert_eq!(on.3, expected, "question {index}: cached tokens");
        assert!(index == 0 || on.3 > on.2 / 2, "the system prompt is copied");
    }
}

/// The second of two prompts sharing `system`, with the first's KV either copied from its
/// busy slot (`busy`: the first has decoded two tokens and waits) or reused in place from its
/// idle slot (the first has finished). Either way the second is prefilled and decoded alone,
/// so the two runs compute the same batches and differ only in how the prefix got there.
#[expect(
    clippy::unwrap_used,
    reason = "a test helper fails its test by panicking"
)]
fn second_prompt(
    config: &MultiModelConfig,
    front: &ModelFrontEnd,
    system: &str,
    questions: [&str; 2],
    busy: bool,
) -> (String, u32, u32, u32) {
    let mut accelerator = Accelerator::new(vec![config.clone()]).unwrap();
    accelerator.load(0).unwrap();
    let mut generations = Vec::new();
    for (seq, question) in (1..).zip(questions) {
        let request = system_request(front, system, question);
        let (prepared, generation) = front.prepare(request).unwrap();
        accelerator.register(seq, 0, prepared, None);
        generations.push(generation);
    }
    assert!(
        accelerator.prefill(0, &[1], &[]).finished.is_empty(),
        "the first is prefilled"
    );
    let first_steps = if busy { 2 } else { 1000 };
    accelerator.decode(0, &[1], first_steps);
    run_straight(&mut accelerator, 0, 2);
    if busy {
        assert_eq!(
            accelerator.decode(0, &[1], 1000).finished.len(),
            1,
            "the first finishes"
        );
    }
    let mut generations = generations.into_iter();
    let first = generations.next().unwrap();
    assert!(collect_cached(first).1 > 0, "the first is answered");
    collect_cached(generations.next().unwrap())
}

/// A prefix copied from another slot is the same KV as the prefix reused in place: the second
/// prompt gives the same greedy answer and the same cached count either way.
#[test]
fn real_model_a_copied_prefix_answers_as_one_reused_in_place() {
    let mut config = smollm2();
    config.context_tokens = 1024;
    let system = long_system_prompt();
    let front = ModelFrontEnd::open(config.clone()).unwrap();
    let questions = ["Which berth leaves first?", "What must boats report?"];
    let copied = second_prompt(&config, &front, &system, questions, true);
    let in_place = second_prompt(&config, &front, &system, questions, false);
    assert_eq!(copied, in_place);
    assert!(
        copied.3 > copied.2 / 2,
        "the system prompt is reused: {copied:?}"
    );
}

/// Gemma-3's sliding window (512 tokens): a prefix is copied from another slot only while the
/// donor's KV is inside the window, and then answers as one reused in place.
#[test]
fn real_model_prefix_copies_stay_inside_a_sliding_window() {
    let mut config = gemma();
    config.context_tokens = 1024;
    let front = ModelFrontEnd::open(config.clone()).unwrap();
    let short = "The harbour has ten berths and one crane. Boats report their cargo to the \
                 harbour master before they leave, and the crane works only at high tide.";
    let long = long_system_prompt();
    let questions = ["Which berth?", "Which crane?"];
    for (system, reused) in [(short, true), (long.as_str(), false)] {
        let copied = second_prompt(&config, &front, system, questions, true);
        let in_place = second_prompt(&config, &front, system, questions, false);
        assert_eq!(copied.3 > 0, reused, "{system:.20}: {copied:?}");
        assert_eq!(copied, in_place, "{system:.20}");
    }
}
