//! `tidepool bench calibrate` on the real models: the written profile loads, its curves come
//! from measurements (positive, ordered by model size where the physics says so), the raw
//! samples are beside it, and the simulator runs on it. Models from `~/.cache/tidepool/models`.

use std::path::PathBuf;
use std::process::Command;

use tidepool_sim::Profile;

fn models_dir() -> PathBuf {
    tidepool_core::config::default_models_dir()
}

#[test]
fn real_model_calibrate_writes_a_profile_the_simulator_runs() {
    let dir = std::env::temp_dir().join(format!("tidepool-calibrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("calibrated.toml");
    let exe = env!("CARGO_BIN_EXE_tidepool");
    let run = Command::new(exe)
        .args([
            "bench",
            "calibrate",
            "--quick",
            "--repeats",
            "1",
            "--threads",
            "2",
        ])
        .arg("--models-dir")
        .arg(models_dir())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "calibrate failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("| smollm2-135m |"), "{stdout}");

    let profile = Profile::load(&out.to_string_lossy()).unwrap();
    assert_eq!(profile.name, "calibrated");
    let names: Vec<&str> = profile.families.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["smollm2-135m", "gemma-3-270m"]);
    let (smol, gemma) = (&profile.families[0], &profile.families[1]);
    for f in &profile.families {
        assert!(f.load_s > 0.0 && f.unload_s >= 0.0, "{f:?}");
        assert!(f.decode_fixed_ms + f.decode_per_seq_ms > 0.0, "{f:?}");
        assert!(f.prefill_per_token_ms + f.prefill_fixed_ms > 0.0, "{f:?}");
        assert_eq!((f.seqs_max, f.seq_tokens_max), (4, 512));
        assert!(f.kv_bytes_per_token > 0, "{f:?}");
    }
    // Gemma-3-270M has twice the parameters (and a 262k vocabulary) of SmolLM2-135M.
    assert!(gemma.weights_bytes > smol.weights_bytes);
    assert!(profile.accelerator.memory_bytes >= 3 * gemma.resident_bytes());
    assert!(profile.accelerator.h2d_bytes_per_s > 0.0);

    // The raw samples (`--quick`): 3 single and 1 grouped prefill, up to 2 × 2 decode samples
    // (one spoiled by an early EOS may be dropped; the fit needs 3), 2 transfers per family.
    let samples: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
    for family in samples["families"].as_array().unwrap() {
        assert_eq!(family["prefill"].as_array().unwrap().len(), 4, "{family}");
        assert!(family["decode"].as_array().unwrap().len() >= 3, "{family}");
    }
    assert_eq!(samples["transfers"].as_array().unwrap().len(), 4);
    resident_check_is_recorded(&samples, &stdout);

    refits_from_its_samples(exe, &out, &profile, &dir);
    sim_runs_on(exe, &out, &dir);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--from-samples`: the samples file alone gives back the same profile, without the models.
#[expect(
    clippy::unwrap_used,
    reason = "test helper: a failure is the test failing"
)]
fn refits_from_its_samples(
    exe: &str,
    out: &std::path::Path,
    profile: &Profile,
    dir: &std::path::Path,
) {
    let refit = dir.join("refit.toml");
    let run = Command::new(exe)
        .args(["bench", "calibrate", "--models-dir", "/nonexistent"])
        .arg("--from-samples")
        .arg(out.with_extension("json"))
        .arg("--out")
        .arg(&refit)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "refit failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let again = Profile::load(&refit.to_string_lossy()).unwrap();
    assert_eq!(again.families, profile.families, "refit families differ");
    assert_eq!(
        again.accelerator, profile.accelerator,
        "refit accelerator differs"
    );
    assert!(
        again.description.contains("refitted"),
        "{}",
        again.description
    );
}

/// `tidepool sim` on the written profile: a small per-model trace, one accelerator. The SLOs are
/// minutes long so that "on time" means "delivered" whatever the measuring machine's speed (a
/// profile calibrated on a loaded VM has decode steps near a second): the test checks that the
/// profile runs every request to completion, not how fast this machine is.
#[expect(
    clippy::unwrap_used,
    reason = "a test helper fails its test by panicking"
)]
fn sim_runs_on(exe: &str, profile: &std::path::Path, dir: &std::path::Path) {
    let trace = dir.join("trace.csv");
    std::fs::write(
        &trace,
        "timestamp,model,prompt_tokens,output_tokens\n0.0,a,64,16\n0.5,b,32,8\n1.0,a,128,16\n",
    )
    .unwrap();
    let report = dir.join("sim.json");
    let sim = Command::new(exe)
        .args(["sim", "--policy", "token", "--accelerators", "1"])
        .arg("--profile")
        .arg(profile)
        .arg("--model-trace")
        .arg(&trace)
        .args(["--ttft-slo-ms", "600000", "--tbt-slo-ms", "60000"])
        .arg("--out")
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        sim.status.success(),
        "sim failed: {}",
        String::from_utf8_lossy(&sim.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["requests"], 3, "{report}");
    assert_eq!(report["requests_rejected"], 0, "{report}");
    assert_eq!(report["tokens_owed"], 16 + 8 + 16, "{report}");
    assert_eq!(report["tokens_on_time"], report["tokens_owed"], "{report}");
    assert!(report["decode_steps"].as_u64().unwrap() > 0, "{report}");
}

/// The resident check (`--quick`: 2 models, one per family): each family's turns alone, beside
/// the other model and in rotation with it, first step apart from the rest, and its table.
#[expect(
    clippy::unwrap_used,
    reason = "test helper: a failure is the test failing"
)]
fn resident_check_is_recorded(samples: &serde_json::Value, stdout: &str) {
    let resident = samples["resident"].as_array().unwrap();
    let families: Vec<&str> = resident
        .iter()
        .map(|r| r["family"].as_str().unwrap())
        .collect();
    assert_eq!(families, ["smollm2-135m", "gemma-3-270m"], "{resident:?}");
    for sample in resident {
        assert_eq!(sample["models"], 2, "{sample}");
        for phase in ["alone", "beside", "rotating"] {
            let first = sample[phase]["first_step_ns"].as_array().unwrap();
            let later = sample[phase]["later_step_ns"].as_array().unwrap();
            assert_eq!(first.len(), later.len(), "{sample}");
            assert!(first.iter().all(|ns| ns.as_u64().unwrap() > 0), "{sample}");
        }
        // An early EOS spoils an attempt; three attempts are made.
        assert!(
            !sample["alone"]["first_step_ns"]
                .as_array()
                .unwrap()
                .is_empty(),
            "{sample}"
        );
    }
    assert!(
        stdout.contains("| gemma-3-270m | 2 | 4 × 128 |"),
        "{stdout}"
    );
}
