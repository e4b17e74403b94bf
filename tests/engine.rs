//! The CPU engine against an independent reference: logits of SmolLM2-135M
//! (GGUF Q4_1, real weights) computed by Hugging Face transformers on the
//! dequantized weights in float32 (`tests/reference/`), and `tpde run` /
//! `tpde bench` end to end.
//!
//! Tolerances. The engine multiplies f32 activations by the weights
//! dequantized in registers, so it computes what the reference computes up
//! to float summation order: every probed logit within `PROBE_TOL` and each
//! position's log-sum-exp within `LSE_TOL` of the reference (which is
//! rounded to 5 decimals), and the same argmax at ≥ 99 % of positions (all
//! 81 agree when measured).

use crate::util::*;
use serde_json::Value;
use std::sync::OnceLock;
use tpde_engine::model::{Model, Placing};
use tpde_loader::LoadOptions;

const PROBE_TOL: f32 = 0.01;
const LSE_TOL: f32 = 0.01;
const SMOLLM: &str = "smollm2-135m-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf";

fn reference() -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference/smollm2-135m-q4_1.json");
    serde_json::from_slice(&std::fs::read(p).expect("committed reference")).unwrap()
}

/// SmolLM2 packed once for the tests of this module, in Cargo's scratch
/// folder for integration tests (a static's temporary folder is never
/// dropped, so it left 93 MB in the system's temp folder every run). Packed
/// anew by each run, which replaces the last run's file.
fn smollm_container() -> &'static std::path::Path {
    static C: OnceLock<std::path::PathBuf> = OnceLock::new();
    C.get_or_init(|| {
        let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("smollm2.tpde");
        let o = tpde(&[&"pack", &fixture(SMOLLM), &"-o", &out]);
        assert!(o.status.success(), "pack: {}", stderr(&o));
        out
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn logsumexp(v: &[f32]) -> f32 {
    let m = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    m + v.iter().map(|x| (x - m).exp()).sum::<f32>().ln()
}

#[test]
fn smollm2_logits_match_transformers() {
    let r = reference();
    let (model, _, _) = Model::load(smollm_container(), LoadOptions::default(), 256).unwrap();
    let vocab = model.config.vocab;
    let probe = ids(&r["probe_ids"]);
    let (mut same, mut total) = (0usize, 0usize);
    let (mut worst_probe, mut worst_lse) = (0.0f32, 0.0f32);
    for case in r["logits_cases"].as_array().unwrap() {
        let tokens = ids(&case["ids"]);
        let mut s = model.session(tokens.len());
        let logits = s.forward(&tokens, true).unwrap();
        assert_eq!(logits.len(), tokens.len() * vocab);
        for (pos, want) in case["positions"].as_array().unwrap().iter().enumerate() {
            let row = &logits[pos * vocab..(pos + 1) * vocab];
            total += 1;
            if tpde_engine::generate::argmax(row) as u64 == want["argmax"].as_u64().unwrap() {
                same += 1;
            }
            for (k, &id) in probe.iter().enumerate() {
                let w = want["probe"][k].as_f64().unwrap() as f32;
                worst_probe = worst_probe.max((row[id as usize] - w).abs());
            }
            let lse = want["logsumexp"].as_f64().unwrap() as f32;
            worst_lse = worst_lse.max((logsumexp(row) - lse).abs());
        }
    }
    eprintln!(
        "SmolLM2 vs transformers: argmax {same}/{total}, worst probed logit {worst_probe:.3}, worst logsumexp {worst_lse:.3}"
    );
    assert!(
        same * 100 >= total * 99,
        "argmax agrees at {same} of {total} positions"
    );
    assert!(
        worst_probe <= PROBE_TOL,
        "probed logit off by {worst_probe}"
    );
    assert!(worst_lse <= LSE_TOL, "log-sum-exp off by {worst_lse}");
}

#[test]
fn smollm2_greedy_generation_matches_transformers() {
    let r = reference();
    let (model, _, _) = Model::load(smollm_container(), LoadOptions::default(), 256).unwrap();
    let prompt = ids(&r["chat"]["ids"]);
    let want = ids(&r["chat"]["generated_ids"]);
    let mut s = model.session(prompt.len() + want.len());
    let mut sampler = tpde_engine::generate::Sampler::new(0.0, 1.0, 0);
    let g =
        tpde_engine::generate::generate(&mut s, &prompt, want.len(), &mut sampler, &[2], |_| {})
            .unwrap();
    assert_eq!(g.tokens, want, "greedy continuation of the chat prompt");
}

#[test]
fn incremental_decoding_equals_one_batch() {
    // The KV cache path (one token at a time) against one pass over the
    // whole sequence: same logits up to float summation order.
    let (model, _, _) = Model::load(smollm_container(), LoadOptions::default(), 256).unwrap();
    let tokens: Vec<u32> = vec![1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47];
    let vocab = model.config.vocab;
    let mut a = model.session(16);
    let all = a.forward(&tokens, true).unwrap();
    let mut b = model.session(16);
    for (i, &t) in tokens.iter().enumerate() {
        let l = b.forward(&[t], false).unwrap();
        let want = &all[i * vocab..(i + 1) * vocab];
        let err = l
            .iter()
            .zip(want)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err < 1e-2, "position {i}: {err}");
    }
    assert!(b.forward(&[0; 7], false).is_err(), "context of 16 exceeded");
    assert!(model.session(4).forward(&[vocab as u32], false).is_err());
}

#[test]
fn tpde_run_answers_a_simple_question() {
    let o = tpde(&[
        &"run",
        &smollm_container(),
        &"-p",
        &"What is the capital of France?",
        &"-n",
        &"24",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("Paris"), "{text:?}");
    assert!(stderr(&o).contains("tok/s"), "{}", stderr(&o));
}

#[test]
fn tpde_bench_reports_pp_tg_and_the_audit() {
    let o = tpde(&[
        &"bench",
        &smollm_container(),
        &"-p",
        &"16",
        &"-n",
        &"8",
        &"--reps",
        &"2",
        &"--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let r = &j["results"];
    for k in ["pp_tps", "tg_tps", "ttft_ms", "load_seconds"] {
        assert!(r[k].as_f64().is_some_and(|v| v > 0.0), "{k}: {r}");
    }
    assert!(r["tg"]["sd"].as_f64().is_some());
    assert_eq!(r["bytes_streamed_per_token"].as_f64(), Some(0.0));
    assert_eq!(r["streamed"], Value::Bool(false));
    assert_eq!(r["page_cache"].as_str(), Some("buffered"));
    // The loading pass with the loader's stage figures.
    let ls = &r["load_stream"];
    assert!(ls["read_bytes"].as_u64().is_some_and(|b| b > 0), "{ls}");
    assert!(
        ls["stages"]["checksum"].as_f64().is_some_and(|s| s > 0.0),
        "{ls}"
    );
    assert!(r["load_effective_gbps"].as_f64().is_some_and(|g| g > 0.0));
    assert!(j["audit"]["environment"]["rustc"].is_string());
    assert_eq!(
        j["audit"]["container"]["manifest_blake3"]
            .as_str()
            .map(str::len),
        Some(64)
    );
}

#[test]
fn models_the_engine_cannot_run_are_clean_errors() {
    // MiniLM is a BERT encoder: no engine architecture, exit 2, one line.
    let dir = tmp();
    let c = dir.path().join("minilm.tpde");
    let o = tpde(&[&"pack", &fixture("all-minilm-l6-v2"), &"-o", &c]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = tpde(&[&"run", &c, &"-p", &"hi"]);
    assert_clean_error(&o, 2, "minilm.tpde", "not supported");
    let o = tpde(&[&"bench", &c, &"-p", &"4", &"-n", &"2"]);
    assert_clean_error(&o, 2, "minilm.tpde", "not supported");
}

/// A copy of the fixture folder `name` in `dir`/model, to edit.
fn copy_of_fixture(name: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let src = dir.join("model");
    std::fs::create_dir(&src).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), src.join(e.file_name())).unwrap();
    }
    src
}

#[test]
fn hostile_hyper_parameters_and_flags_are_clean_errors() {
    // A copy of the Mixtral fixture with one value of its config.json
    // changed: an expert count that wraps when multiplied by the router's
    // size (it passed the shape check and then panicked or aborted), and a
    // feed-forward width of 0.
    for (key, value, phrase) in [
        (
            "num_local_experts",
            "288230376151711748",
            "sizes beyond any supported model",
        ),
        ("intermediate_size", "0", "a feed-forward width of 0"),
    ] {
        let d = tmp();
        let src = copy_of_fixture("moe-mixtral-tiny", d.path());
        let mut config: Value =
            serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
        config[key] = serde_json::from_str(value).unwrap();
        std::fs::write(src.join("config.json"), config.to_string()).unwrap();
        let c = d.path().join("m.tpde");
        let o = tpde(&[&"pack", &src, &"-o", &c]);
        assert!(o.status.success(), "{}", stderr(&o));
        for args in [
            vec!["run", "-p", "hi", "-n", "2"],
            vec!["run", "-p", "hi", "-n", "2", "--ram", "15MiB"],
            vec![
                "bench",
                "-p",
                "4",
                "-n",
                "2",
                "--reps",
                "1",
                "--stream-layers",
            ],
        ] {
            let mut a: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&args[0], &c];
            a.extend(args[1..].iter().map(|x| x as &dyn AsRef<std::ffi::OsStr>));
            let o = tpde(&a);
            assert_clean_error(&o, 2, "m.tpde", phrase);
        }
    }
    // A prompt length from the command line that no context holds (it
    // overflowed an allocation).
    let c = smollm_container();
    let o = tpde(&[&"bench", &c, &"-p", &"18446744073709551615", &"-n", &"2"]);
    assert_clean_error(
        &o,
        2,
        "smollm2.tpde",
        "does not fit the model's context of 8192",
    );
    // Before the weights load: a budget too small to load them is not
    // what the error is about.
    let o = tpde(&[&"bench", &c, &"-p", &"8193", &"-n", &"2", &"--ram", &"1MiB"]);
    assert_clean_error(
        &o,
        2,
        "smollm2.tpde",
        "a prompt of 8193 tokens does not fit",
    );
}

#[test]
fn a_chat_template_that_exhausts_memory_ends_in_a_clean_error() {
    // The Mixtral fixture with a byte-level tokenizer of 26 letters and a
    // chat template of its own. minijinja's `~` has no bound: doubling a
    // string through a namespace, or through a `{% set %}` block, asked
    // for all the machine's memory; the rendering now has 256 MiB.
    let d = tmp();
    let src = copy_of_fixture("moe-mixtral-tiny", d.path());
    let vocab: serde_json::Map<String, Value> = ('a'..='z')
        .enumerate()
        .map(|(i, c)| (c.to_string(), Value::from(i)))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(src.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let c = d.path().join("m.tpde");
    for (template, fails) in [
        ("{% for m in messages %}{{ m['content'] }}{% endfor %}", false),
        (
            "{% set ns = namespace(a='x') %}{% for i in range(64) %}{% set ns.a = ns.a ~ ns.a %}{% endfor %}{{ ns.a|length }}",
            true,
        ),
        (
            "{% set ns = namespace(a='xxxxxxxx') %}{% for i in range(48) %}{% set b %}{{ ns.a }}{{ ns.a }}{% endset %}{% set ns.a = b %}{% endfor %}{{ ns.a|length }}",
            true,
        ),
    ] {
        let config = serde_json::json!({ "chat_template": template });
        std::fs::write(src.join("tokenizer_config.json"), config.to_string()).unwrap();
        let o = tpde(&[&"pack", &src, &"-o", &c]);
        assert!(o.status.success(), "{}", stderr(&o));
        let t = std::time::Instant::now();
        let o = tpde(&[&"run", &c, &"-p", &"hi", &"-n", &"2"]);
        if fails {
            assert_clean_error(&o, 2, "m.tpde", "chat template: needs more than 256 MiB of memory");
            assert!(t.elapsed().as_secs() < 30, "{template}: {:?}", t.elapsed());
        } else {
            assert!(o.status.success(), "{template}: {}", stderr(&o));
        }
    }
}

/// Full logits of the three synthetic MoE fixtures against transformers
/// (`tests/reference/moe-tiny.json`): Mixtral (safetensors, BF16), Qwen2-MoE
/// (shared expert with a sigmoid gate, q/k/v biases, no top-k
/// renormalization) and the Mixtral model as llama.cpp-style GGUF (stacked
/// experts, Q8_0 and F16). Their logits are small (|l| < 0.7), so the
/// tolerance is absolute: 2e-4. Every argmax whose reference lead is over
/// 1e-4 must agree (one Qwen position leads by 1.5e-5 and is not asked).
#[test]
fn moe_fixtures_logits_match_transformers() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/moe-tiny.json");
    let r: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    let dir = tmp();
    for (key, src) in [
        ("mixtral", fixture("moe-mixtral-tiny")),
        ("qwen", fixture("moe-qwen-tiny")),
        ("mixtral_gguf", fixture("moe-mixtral-tiny-gguf/model.gguf")),
    ] {
        let c = dir.path().join(format!("{key}.tpde"));
        let o = tpde(&[&"pack", &src, &"-o", &c]);
        assert!(o.status.success(), "{key}: {}", stderr(&o));
        let (model, _, _) = Model::load(&c, LoadOptions::default(), 64).unwrap();
        assert!(model.config.n_experts > 0, "{key}: not loaded as MoE");
        let want = &r[key];
        let tokens = ids(&want["ids"]);
        let vocab = model.config.vocab;
        let mut s = model.session(tokens.len());
        let got = s.forward(&tokens, true).unwrap();
        let mut worst = 0.0f32;
        for (pos, row) in want["logits"].as_array().unwrap().iter().enumerate() {
            let g = &got[pos * vocab..(pos + 1) * vocab];
            let mut w: Vec<f32> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            for (a, b) in g.iter().zip(&w) {
                worst = worst.max((a - b).abs());
            }
            let best = tpde_engine::generate::argmax(&w) as usize;
            let top = w[best];
            w[best] = f32::NEG_INFINITY;
            let second = w.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            if top - second > 1e-4 {
                assert_eq!(
                    tpde_engine::generate::argmax(g) as usize,
                    best,
                    "{key} position {pos}"
                );
            }
        }
        eprintln!("{key}: worst logit difference {worst:.2e}");
        assert!(worst <= 2e-4, "{key}: logits off by {worst}");
        // Routing was exercised: experts of every layer were chosen.
        assert!(s.expert_hits.iter().all(|l| l.iter().sum::<u64>() > 0));
    }
}

/// Logits of `tokens`: one batch (every position), then three tokens one
/// at a time (the last position each).
fn logits_of(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut s = model.session(tokens.len() + 3);
    let mut out = s.forward(tokens, true).unwrap();
    for &t in &tokens[..3] {
        out.extend(s.forward(&[t], false).unwrap());
    }
    out
}

#[test]
fn layers_streamed_per_token_compute_the_same_logits_as_resident_ones() {
    let tokens = ids(&reference()["probe_ids"]);
    let tokens = &tokens[..12];
    let (resident, _, _) = Model::load(smollm_container(), LoadOptions::default(), 64).unwrap();
    assert!(!resident.is_streamed());
    let want = logits_of(&resident, tokens);
    let placing = Placing {
        ctx: 64,
        stream: true,
        expert_cache: None,
    };
    let (streamed, _, load) =
        Model::load_with(smollm_container(), LoadOptions::default(), &placing).unwrap();
    assert!(streamed.is_streamed() && load.placement.streamed);
    assert!(
        streamed.weight_bytes * 2 < resident.weight_bytes,
        "only the embedding resident"
    );
    let got = logits_of(&streamed, tokens);
    assert!(got == want, "streamed logits differ from resident ones");
    // One pass over the layers per forward call, each reading them all.
    let st = streamed.stream_stats().unwrap();
    assert_eq!(st.passes, 4);
    assert_eq!(st.layer_bytes % 4, 0);
    let per_pass = st.layer_bytes / 4;
    assert!(
        per_pass as f64 > 0.6 * std::fs::metadata(smollm_container()).unwrap().len() as f64,
        "{per_pass} bytes a pass"
    );
    assert_eq!(st.expert_bytes, 0);
}

/// Each MoE fixture with its layers streamed and its experts fetched from
/// their shards: the same logits as resident whatever the cache holds, and
/// the cache's counts are those of an LRU over the routing.
#[test]
fn streamed_experts_match_resident_ones_and_the_cache_counts_its_hits() {
    let dir = tmp();
    for (key, src) in [
        ("mixtral", fixture("moe-mixtral-tiny")),
        ("qwen", fixture("moe-qwen-tiny")),
        ("mixtral_gguf", fixture("moe-mixtral-tiny-gguf/model.gguf")),
    ] {
        let c = dir.path().join(format!("{key}.tpde"));
        let o = tpde(&[&"pack", &src, &"-o", &c]);
        assert!(o.status.success(), "{key}: {}", stderr(&o));
        // At base fidelity, resident layers and streamed experts both come
        // as base blocks: the logits must still be the same bits.
        for fidelity in [tpde_pack::Fidelity::Exact, tpde_pack::Fidelity::Base] {
            let opts = LoadOptions {
                fidelity,
                ..LoadOptions::default()
            };
            streamed_experts_case(key, &c, &opts);
        }
        // Layers and expert shards read with O_DIRECT.
        let direct = LoadOptions {
            direct: true,
            ..LoadOptions::default()
        };
        if let Err(e) = Model::load(&c, direct.clone(), 64) {
            // tmpfs and some overlay file systems refuse O_DIRECT; any
            // other error is a failure.
            assert!(e.to_string().contains("O_DIRECT"), "{key}: {e}");
            eprintln!(
                "note: O_DIRECT is not supported where the tests write ({e}); the O_DIRECT case is not run"
            );
            continue;
        }
        streamed_experts_case(key, &c, &direct);
    }
}

fn streamed_experts_case(key: &str, c: &std::path::Path, opts: &LoadOptions) {
    let f = opts.fidelity;
    let (resident, _, _) = Model::load(c, opts.clone(), 64).unwrap();
    let tokens: Vec<u32> = (0..10u32).map(|i| (i * 37 + 5) % 256).collect();
    // Token by token, so that each forward call looks up exactly k
    // experts per layer.
    let run = |m: &Model| {
        let mut s = m.session(tokens.len());
        let mut out = Vec::new();
        for &t in &tokens {
            out.extend(s.forward(&[t], false).unwrap());
        }
        (out, s.expert_hits.clone())
    };
    let (want, hits) = run(&resident);
    let cfg = &resident.config;
    let lookups = (tokens.len() * cfg.n_layers * cfg.n_experts_used) as u64;
    let distinct = hits.iter().flatten().filter(|&&h| h > 0).count() as u64;
    // The largest expert, for a cache that holds two.
    let one = {
        let placing = Placing {
            ctx: 64,
            stream: true,
            expert_cache: None,
        };
        let (m, _, _) = Model::load_with(c, opts.clone(), &placing).unwrap();
        run(&m);
        let cs = m.stream_stats().unwrap().cache;
        cs.peak_bytes / cs.misses.max(1)
    };
    for cap in [Some(0), Some(2 * one + one / 2), None] {
        let placing = Placing {
            ctx: 64,
            stream: true,
            expert_cache: cap,
        };
        let (m, _, _) = Model::load_with(c, opts.clone(), &placing).unwrap();
        let (got, got_hits) = run(&m);
        assert!(
            got == want,
            "{key} {f:?} cache {cap:?}: logits differ from resident"
        );
        assert_eq!(got_hits, hits, "{key}: same routing");
        let st = m.stream_stats().unwrap();
        let cs = st.cache;
        assert_eq!(cs.hits + cs.misses, lookups, "{key} {f:?} {cap:?}: {cs:?}");
        assert!(cs.peak_bytes <= cs.capacity_bytes, "{key}: {cs:?}");
        assert!(st.expert_bytes > 0);
        match cap {
            Some(0) => assert_eq!(cs.hits, 0, "{key}: nothing kept"),
            None => {
                assert_eq!(cs.misses, distinct, "{key}: each expert fetched once");
                assert_eq!(cs.evictions, 0);
            }
            Some(_) => {
                assert!(cs.misses >= distinct && cs.misses <= lookups);
                assert!(
                    cs.evictions > 0,
                    "{key} {f:?}: a cache of two experts evicts"
                );
            }
        }
    }
}

#[test]
fn a_budget_below_the_resident_model_streams_the_layers_within_it() {
    // 128 MiB cannot hold SmolLM2 resident (its hot tier and its weights
    // are about 190 MiB): the layers stream from the container per token.
    let o = tpde(&[
        &"bench",
        &smollm_container(),
        &"--ram",
        &"128MiB",
        &"-p",
        &"8",
        &"-n",
        &"8",
        &"--reps",
        &"1",
        &"--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let r = &j["results"];
    assert_eq!(r["streamed"], Value::Bool(true), "{r}");
    let per_token = r["bytes_streamed_per_token"].as_f64().unwrap();
    let file = std::fs::metadata(smollm_container()).unwrap().len() as f64;
    assert!(per_token > 0.6 * file && per_token < file, "{per_token}");
    let peak = r["peak_rss_bytes"].as_u64().unwrap();
    assert!(peak <= 128 << 20, "peak RSS {peak} over the budget");
    for k in [
        "physical_bound_tps",
        "tg_vs_bound",
        "tg_tps",
        "container_read_gbps",
    ] {
        assert!(r[k].as_f64().is_some_and(|v| v > 0.0), "{k}: {r}");
    }
    // And the text is the same.
    let o = tpde(&[
        &"run",
        &smollm_container(),
        &"--ram",
        &"128MiB",
        &"-p",
        &"What is the capital of France?",
        &"-n",
        &"24",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Paris"), "{}", stdout(&o));
}

#[test]
fn a_budget_too_small_even_to_stream_is_a_clean_error() {
    let o = tpde(&[
        &"bench",
        &smollm_container(),
        &"--ram",
        &"48MiB",
        &"-p",
        &"4",
        &"-n",
        &"2",
    ]);
    assert_clean_error(&o, 2, "smollm2.tpde", "too small");
}

#[test]
fn bad_sampling_flags_are_usage_errors() {
    for (flag, arg) in [
        ("--temperature", "--temperature=-1"),
        ("--temperature", "--temperature=NaN"),
        ("--top-p", "--top-p=0"),
        ("--top-p", "--top-p=1.5"),
    ] {
        let o = tpde(&[&"run", &smollm_container(), &"-p", &"hi", &arg]);
        assert_clean_error(&o, 2, flag, "must be");
    }
}

/// At base fidelity a decomposed model computes on its q4 base blocks
/// (repacked as Q4_0), holding a fraction of the exact model's memory.
#[test]
fn base_fidelity_computes_on_the_base_blocks() {
    let dir = tmp();
    let c = dir.path().join("mixtral.tpde");
    let o = tpde(&[&"pack", &fixture("moe-mixtral-tiny"), &"-o", &c]);
    assert!(o.status.success(), "{}", stderr(&o));
    let opts = |fidelity| LoadOptions {
        fidelity,
        ..LoadOptions::default()
    };
    let (exact, _, _) = Model::load(&c, opts(tpde_pack::Fidelity::Exact), 64).unwrap();
    let (base, _, load) = Model::load(&c, opts(tpde_pack::Fidelity::Base), 64).unwrap();
    assert!(
        base.weight_bytes * 4 < exact.weight_bytes,
        "{} vs {} bytes",
        base.weight_bytes,
        exact.weight_bytes
    );
    // The loader delivered base blocks, not values.
    assert!(load.stream.delivered_bytes * 2 < exact.weight_bytes as u64);
    let tokens: Vec<u32> = (0..12u32).map(|i| (i * 29 + 3) % 256).collect();
    let a = exact.session(16).forward(&tokens, true).unwrap();
    let b = base.session(16).forward(&tokens, true).unwrap();
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    let scale = a.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    eprintln!("base vs exact: worst logit difference {worst:.3e} (largest logit {scale:.3e})");
    assert!(b.iter().all(|x| x.is_finite()));
    assert!(worst > 0.0, "a 4-bit base differs from the exact weights");
    assert!(
        worst < 0.25 * scale,
        "base logits far from exact ones: {worst} of {scale}"
    );
}

/// Llama-3 rope scaling against transformers' `ROPE_INIT_FUNCTIONS["llama3"]`
/// (`tests/reference/llama3-rope.json`, from `rope_reference.py`): the rope
/// settings of Llama-3.1-8B and Llama-3.2-1B, and a small config whose
/// scaling bends inside its 16 frequencies. Every inverse frequency within
/// 2e-6 relative (f32 against transformers' f32 arithmetic).
#[test]
fn llama3_rope_scaling_matches_transformers() {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/llama3-rope.json");
    let r: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    let cases = r["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 3);
    for (name, case) in cases {
        let config = serde_json::to_vec(&case["config"]).unwrap();
        let c = tpde_engine::config::Config::from_hf_json(&config).unwrap();
        let got = c.rope_inv_freq();
        let want: Vec<f64> = case["inv_freq"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), want.len(), "{name}");
        let mut scaled = 0;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let rel = (*g as f64 - w).abs() / w.abs();
            assert!(rel <= 2e-6, "{name} pair {i}: {g} vs {w}");
            let plain = c.rope_base.powf(-2.0 * i as f32 / c.rope_dim as f32) as f64;
            if (plain - w).abs() / w > 1e-3 {
                scaled += 1;
            }
        }
        assert!(scaled > 0, "{name}: the scaling changes some frequencies");
    }
}

#[test]
fn bad_streaming_flags_are_usage_errors() {
    let c = smollm_container();
    for args in [
        vec!["--stream-only", "--stream-layers"],
        vec!["--stream-only", "--expert-cache", "1MiB"],
        vec!["--expert-cache", "lots"],
        vec!["--ram", "-5"],
    ] {
        let mut argv: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"bench", &c];
        for a in &args {
            argv.push(a);
        }
        let o = tpde(&argv);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{args:?}");
        assert!(o.stdout.is_empty(), "{args:?}");
    }
    let o = tpde(&[&"run", &c, &"-p", &"hi", &"--ram", &"1KB"]);
    assert_clean_error(&o, 2, "smollm2.tpde", "budget");
}
