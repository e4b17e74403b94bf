//! The runtime loader: execution order, exact bytes, the memory budget,
//! damage found mid-stream, a file truncated under it, and `tpde bench
//! --stream-only`.

use crate::util::*;
use std::path::Path;
use tpde_loader::{LoadOptions, Loader, ReadPath, StepStores};
use tpde_pack::Fidelity;

/// A delivered tensor: manifest index, name, bytes.
struct Got {
    index: usize,
    name: String,
    data: Vec<u8>,
}

/// Streams the whole container (twice: the second pass finds the hot tier
/// resident and must deliver the same); returns (step name, tensors) in
/// delivery order.
fn stream_all(path: &Path, opts: LoadOptions) -> Vec<(String, Vec<Got>)> {
    let asked = opts.reads;
    let direct = opts.direct;
    let mut loader = Loader::open(path, opts).unwrap();
    let mut passes = Vec::new();
    for pass in 0..2 {
        let mut got = Vec::new();
        let report = loader
            .stream(|step| {
                for t in &step.tensors {
                    assert!(
                        step.bytes(t).as_ptr().addr().is_multiple_of(64),
                        "{}: starts on a cache line",
                        t.name
                    );
                }
                let ts: Vec<Got> = step
                    .tensors
                    .iter()
                    .map(|t| Got {
                        index: t.index,
                        name: t.name.clone(),
                        data: step.bytes(t).to_vec(),
                    })
                    .collect();
                got.push((step.name.clone(), ts));
                Ok(())
            })
            .unwrap();
        assert_eq!(report.steps, got.len());
        assert_streamed_by(&report, asked, direct);
        assert_eq!(
            report.hot_bytes == 0,
            pass == 1,
            "the hot tier is read once"
        );
        passes.push(got);
    }
    let second = passes.pop().unwrap();
    let first = passes.pop().unwrap();
    for ((a, ta), (b, tb)) in first.iter().zip(&second) {
        assert_eq!(a, b);
        for (x, y) in ta.iter().zip(tb) {
            assert!(x.data == y.data, "{}: second pass differs", x.name);
        }
    }
    first
}

/// Who read a pass's streamed sections is the one asked for: never the
/// jobs with O_DIRECT, nor for a pass that streams nothing. (`Auto` depends
/// on the page cache: `the_read_path_follows_the_page_cache`.)
fn assert_streamed_by(report: &tpde_loader::StreamReport, asked: ReadPath, direct: bool) {
    let streamed = report.read_bytes > report.hot_bytes;
    let want = match asked {
        ReadPath::Auto if streamed && !direct => return,
        ReadPath::Jobs if streamed && !direct => ReadPath::Jobs,
        _ => ReadPath::Readers,
    };
    assert_eq!(
        report.streamed_reads, want,
        "asked {asked:?}, O_DIRECT {direct}"
    );
}

/// `Auto` reads in the jobs when the container is in the page cache and
/// with the reader threads when it is not.
#[test]
fn the_read_path_follows_the_page_cache() {
    let (_d, _s, moe) = packed(&moe_model(14), &[]);
    let pass = |reads| {
        let opts = LoadOptions {
            reads,
            ..LoadOptions::default()
        };
        let mut loader = Loader::open(&moe, opts).unwrap();
        let report = loader.stream(|_| Ok(())).unwrap();
        assert!(
            report.read_bytes > report.hot_bytes,
            "something is streamed"
        );
        report.streamed_reads
    };
    // Read through: cached.
    std::fs::read(&moe).unwrap();
    assert_eq!(pass(ReadPath::Auto), ReadPath::Jobs);
    let f = std::fs::File::open(&moe).unwrap();
    tpde_loader::telemetry::drop_page_cache(&f);
    if tpde_loader::telemetry::in_page_cache(&f, &moe, std::iter::once((0, 1))) {
        eprintln!(
            "note: the page cache of {} could not be dropped (tmpfs?); the uncached case is not checked",
            moe.display()
        );
    } else {
        // (The open reads the manifest back into the cache, not the sections.)
        assert_eq!(pass(ReadPath::Auto), ReadPath::Readers);
    }
}

/// A folder model with layers 0 and 1 (plus pre and post tensors) and a
/// mixture-of-experts model.
fn containers() -> Vec<(tempfile::TempDir, std::path::PathBuf)> {
    let d = tmp();
    write_sharded_folder(d.path(), 4);
    let out = d.path().join("folder.tpde");
    let o = tpde(&[&"pack", &d.path(), &"-o", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (d2, _, moe) = packed(&moe_model(8), &[]);
    vec![(d, out), (d2, moe)]
}

#[test]
fn every_tensor_arrives_once_in_execution_order_with_its_exact_bytes() {
    for (_d, path) in containers() {
        let c = tpde_pack::Container::open(&path).unwrap();
        let m = &c.manifest;
        // The smallest step's size: the larger steps are stored past the
        // cache, the smallest not, in the same pass.
        let mut sizes: Vec<u64> = Loader::open(&path, LoadOptions::default())
            .unwrap()
            .steps()
            .iter()
            .map(|s| s.out_bytes)
            .collect();
        sizes.sort_unstable();
        let mid = sizes[0];
        assert!(mid < sizes[sizes.len() - 1], "{sizes:?}");
        let ways = [
            (false, ReadPath::Readers, StepStores::PastCache),
            (false, ReadPath::Jobs, StepStores::PastCache),
            (false, ReadPath::Auto, StepStores::BySize),
            (false, ReadPath::Readers, StepStores::Above(mid)),
            (false, ReadPath::Auto, StepStores::Cached),
            (true, ReadPath::Auto, StepStores::PastCache),
            (true, ReadPath::Jobs, StepStores::Cached),
        ];
        for (direct, reads, stores) in ways {
            let opts = LoadOptions {
                direct,
                reads,
                stores,
                ..LoadOptions::default()
            };
            if direct && Loader::open(&path, opts.clone()).is_err() {
                // tmpfs and some overlay file systems refuse O_DIRECT.
                eprintln!(
                    "note: O_DIRECT is not supported where the tests write ({}); the O_DIRECT pass is not run",
                    path.display()
                );
                continue;
            }
            let got = stream_all(&path, opts);
            let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
            // Steps: pre, then layers in ascending order, then post.
            let rank = |n: &str| match n {
                "pre" => (0, 0),
                "post" => (2, 0),
                l => (1, l.trim_start_matches("layer.").parse::<u32>().unwrap()),
            };
            assert!(
                names.windows(2).all(|w| rank(w[0]) < rank(w[1])),
                "{}: steps out of order: {names:?}",
                path.display()
            );
            let order: Vec<usize> = got
                .iter()
                .flat_map(|(_, ts)| ts.iter().map(|t| t.index))
                .collect();
            assert_eq!(
                order,
                (0..m.tensors.len()).collect::<Vec<_>>(),
                "every tensor once, in manifest (execution) order"
            );
            for (_, ts) in &got {
                for t in ts {
                    let want = &m.tensors[t.index];
                    assert_eq!(
                        blake3::hash(&t.data).to_hex().as_str(),
                        want.blake3,
                        "{}: exact bytes",
                        t.name
                    );
                }
            }
        }
        // Base fidelity: same tensors and lengths; decomposed ones are the
        // base's values, the others exact; the same bytes whoever reads and
        // however the values are stored.
        let mut first: Option<Vec<Vec<u8>>> = None;
        for (reads, stores) in [
            (ReadPath::Readers, StepStores::PastCache),
            (ReadPath::Jobs, StepStores::BySize),
            (ReadPath::Auto, StepStores::Cached),
            (ReadPath::Readers, StepStores::Above(mid)),
        ] {
            let base = stream_all(
                &path,
                LoadOptions {
                    fidelity: Fidelity::Base,
                    reads,
                    stores,
                    ..LoadOptions::default()
                },
            );
            let bytes: Vec<Vec<u8>> = base
                .iter()
                .flat_map(|(_, ts)| ts.iter().map(|t| t.data.clone()))
                .collect();
            match &first {
                None => first = Some(bytes),
                Some(f) => assert!(*f == bytes, "{reads:?} {stores:?}: other base bytes"),
            }
            for (_, ts) in &base {
                for t in ts {
                    let want = &m.tensors[t.index];
                    assert_eq!(t.data.len() as u64, want.byte_len);
                    let same = blake3::hash(&t.data).to_hex().as_str() == want.blake3;
                    let decomposed =
                        matches!(want.storage, tpde_format::Storage::Decomposed { .. });
                    assert_eq!(same, !decomposed, "{}", t.name);
                }
            }
        }
    }
}

#[test]
fn base_fidelity_reads_no_dense_residual_and_only_the_hot_part_of_shards() {
    let (_d, _s, moe) = packed(&moe_model(9), &[]);
    let c = tpde_pack::Container::open(&moe).unwrap();
    let m = &c.manifest;
    let opts = |fidelity| LoadOptions {
        fidelity,
        ..LoadOptions::default()
    };
    let exact = Loader::open(&moe, opts(Fidelity::Exact)).unwrap();
    let base = Loader::open(&moe, opts(Fidelity::Base)).unwrap();
    let sum = |l: &Loader| l.steps().iter().map(|s| s.read_bytes).sum::<u64>();
    let kind_bytes = |k| {
        m.sections
            .iter()
            .filter(|s| s.kind == k)
            .map(|s| s.len)
            .sum::<u64>()
    };
    use tpde_format::SectionKind;
    assert_eq!(
        sum(&exact),
        kind_bytes(SectionKind::Cold) + kind_bytes(SectionKind::Expert),
        "exact: every cold section and shard, once"
    );
    assert_eq!(
        sum(&base),
        m.experts.iter().map(|x| x.hot_len).sum::<u64>(),
        "base: the shards' hot parts only"
    );
}

/// `tpde bench --stream-only --json` with `extra` flags: the JSON, or the failed output.
fn bench_json(c: &Path, extra: &[&str]) -> Result<serde_json::Value, std::process::Output> {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"bench", &c, &"--stream-only", &"--reps", &"1", &"--json"];
    for e in extra {
        args.push(e);
    }
    let o = tpde(&args);
    if !o.status.success() {
        return Err(o);
    }
    Ok(serde_json::from_slice(&o.stdout).expect("one JSON object"))
}

#[test]
fn the_memory_budget_is_enforced_before_anything_big_is_allocated() {
    // In a process of its own, so that the resident baseline is this
    // loader's, not the test harness's.
    let (_d, _s, c) = packed(&large_expert_model(), &[]);
    let free = bench_json(&c, &[]).unwrap();
    let plan = &free["results"]["memory"];
    let n = |k: &str| plan[k].as_u64().unwrap();
    let (base, hot, slot, out) = (
        n("baseline_rss"),
        n("hot"),
        n("pool_buffer_bytes"),
        n("output_bytes"),
    );
    assert_eq!(n("pool_buffers"), 2, "double buffering by default");
    assert!(slot > 4 << 20 && out > 4 << 20, "{plan}");
    let budget = |b: u64| b.to_string();
    // Too small for the process and its hot tier.
    let o = bench_json(&c, &["--ram", &budget(base / 2)]).unwrap_err();
    assert_clean_error(&o, 2, "model.tpde", "cannot hold the hot tier");
    // Room for the hot tier, not for one step besides.
    let o = bench_json(&c, &["--ram", &budget(base + hot + slot / 2)]).unwrap_err();
    assert_clean_error(&o, 2, "model.tpde", "too small to stream");
    // Room for one read buffer, not two: prefetch drops to 1, and the
    // whole process stays within the budget.
    // The decode threads and the calling thread, which decodes too.
    let threads = (n("decode_threads") + 1) * n("per_thread_bytes");
    // The hot buffer and the read pool are whole huge pages.
    let whole = tpde_pack::container::whole_huge_pages;
    assert_eq!(
        n("huge_page_slack"),
        whole(hot) - hot + whole(2 * slot) - 2 * slot,
        "{plan}"
    );
    assert_eq!(
        n("total"),
        base + hot + 2 * slot + out + threads + n("huge_page_slack"),
        "{plan}"
    );
    let b = base + whole(hot) + whole(slot) + out + threads + slot / 2;
    let one = bench_json(&c, &["--ram", &budget(b)]).unwrap();
    let r = &one["results"];
    assert_eq!(r["memory"]["pool_buffers"], 1, "{}", r["memory"]);
    assert!(r["memory"]["total"].as_u64().unwrap() <= b);
    let peak = r["peak_rss_bytes"].as_u64().unwrap();
    assert!(peak <= b, "peak RSS {peak} over the budget {b}");
    assert_eq!(r["tensors"], 6);
    // A prefetch depth from the command line that no pool could have (its
    // size overflowed): at most one segment more than there are steps.
    let deep = bench_json(&c, &["--prefetch", "4611686018427387904"]).unwrap();
    let r = &deep["results"];
    let steps = r["steps"].as_u64().unwrap();
    assert!(
        (1..=steps + 1).contains(&r["memory"]["pool_buffers"].as_u64().unwrap()),
        "{}",
        r["memory"]
    );
}

#[test]
fn a_damaged_chunk_mid_stream_stops_the_stream_before_its_step() {
    let (d, _s, moe) = packed(&moe_model(11), &[]);
    let c = tpde_pack::Container::open(&moe).unwrap();
    // A byte of a residual in layer 1's first expert shard.
    let s = c
        .manifest
        .sections
        .iter()
        .find(|s| s.name == "expert.1.0")
        .unwrap()
        .clone();
    let x = c
        .manifest
        .experts
        .iter()
        .find(|x| (x.layer, x.expert) == (1, 0))
        .unwrap();
    let mut bytes = std::fs::read(&moe).unwrap();
    bytes[(s.offset + x.hot_len + 5) as usize] ^= 0x40;
    let bad = write(d.path(), "bad.tpde", &bytes);
    for reads in [ReadPath::Readers, ReadPath::Jobs] {
        let opts = LoadOptions {
            reads,
            ..LoadOptions::default()
        };
        let mut loader = Loader::open(&bad, opts).unwrap();
        let mut steps = Vec::new();
        let e = loader
            .stream(|step| {
                // Whatever arrives is exact.
                for t in &step.tensors {
                    assert_eq!(
                        blake3::hash(step.bytes(t)).to_hex().as_str(),
                        c.manifest.tensors[t.index].blake3
                    );
                }
                steps.push(step.name.clone());
                Ok(())
            })
            .expect_err("damage found");
        assert!(e.is_integrity());
        let msg = e.to_string();
        assert!(
            msg.contains("bad.tpde")
                && msg.contains("checksum mismatch")
                && msg.contains("experts.0."),
            "{msg}"
        );
        assert_eq!(
            steps,
            ["pre", "layer.0"],
            "layer 1 is never delivered ({reads:?})"
        );
    }
}

#[test]
fn a_container_truncated_while_streaming_gives_a_clean_error() {
    let (d, _s, moe) = packed(&moe_model(12), &[]);
    for reads in [ReadPath::Readers, ReadPath::Jobs] {
        let copy = d.path().join("t.tpde");
        std::fs::copy(&moe, &copy).unwrap();
        let opts = LoadOptions {
            reads,
            ..LoadOptions::default()
        };
        let mut loader = Loader::open(&copy, opts).unwrap();
        // Cut the file in the middle of the streamed sections, after opening.
        let cut = loader
            .container
            .manifest
            .sections
            .iter()
            .find(|s| s.name == "expert.1.2")
            .unwrap()
            .offset;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&copy)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let mut seen = 0;
        let e = loader
            .stream(|_| {
                seen += 1;
                Ok(())
            })
            .expect_err("the cut is noticed");
        let msg = e.to_string();
        assert!(
            msg.contains("t.tpde") && msg.contains("cannot read"),
            "{msg}"
        );
        assert_eq!(msg.lines().count(), 1);
        assert!(
            seen <= 2,
            "nothing from the cut step on is delivered ({reads:?})"
        );
    }
}

#[test]
fn a_consumer_error_stops_the_reader() {
    let (_d, _s, moe) = packed(&moe_model(13), &[]);
    let mut loader = Loader::open(&moe, LoadOptions::default()).unwrap();
    let e = loader
        .stream(|step| {
            if step.name == "layer.0" {
                Err(tpde_pack::Error::input(Path::new("consumer"), "enough"))
            } else {
                Ok(())
            }
        })
        .expect_err("the consumer's error");
    assert_eq!(e.to_string(), "consumer: enough");
}

#[test]
fn bench_stream_only_reports_figures_and_an_audit_trail() {
    let (d, _s, moe) = packed(&moe_model(14), &[]);
    let o = tpde(&[
        &"bench",
        &moe,
        &"--stream-only",
        &"--ram",
        &"256MiB",
        &"--reps",
        &"1",
        &"--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let r = &j["results"];
    for k in [
        "raw_read_gbps",
        "container_read_gbps",
        "effective_gbps",
        "bytes_read",
        "original_bytes",
        "peak_rss_bytes",
    ] {
        assert!(r[k].is_number(), "results.{k}: {}", r[k]);
    }
    let c = tpde_pack::Container::open(&moe).unwrap();
    assert_eq!(
        r["original_bytes"],
        c.manifest.tensors.iter().map(|t| t.byte_len).sum::<u64>()
    );
    assert!(r["peak_rss_bytes"].as_u64().unwrap() <= 256 << 20);
    assert_eq!(r["fidelity"], "exact");
    let a = &j["audit"];
    for k in [
        "tpde_version",
        "git_commit",
        "rustc",
        "os",
        "kernel",
        "cpu_model",
        "ram_bytes",
    ] {
        assert!(!a["environment"][k].is_null(), "audit.environment.{k}");
    }
    assert_eq!(
        a["container"]["manifest_blake3"].as_str().unwrap(),
        tpde_format::hex(&c.header.manifest_blake3)
    );
    assert!(a["flags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "--stream-only"));
    assert!(a["started"].as_str().unwrap() <= a["ended"].as_str().unwrap());
    // The readable table, and the errors.
    let o = tpde(&[
        &"bench",
        &moe,
        &"--stream-only",
        &"--reps",
        &"1",
        &"--fidelity",
        &"base",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("effective") && stdout(&o).contains("bottleneck"));
    let o = tpde(&[&"bench", &moe, &"--stream-only", &"--ram", &"1MiB"]);
    assert_clean_error(&o, 2, "model.tpde", "memory budget");
    // Without --stream-only the model itself runs; this synthetic one
    // carries no model description, and the error points to the loader bench.
    let o = tpde(&[&"bench", &moe]);
    assert_clean_error(&o, 2, "model.tpde", "--stream-only");
    let o = tpde(&[&"bench", &d.path().join("none.tpde"), &"--stream-only"]);
    assert_clean_error(&o, 2, "none.tpde", "");
}

/// Every delivered tensor by manifest index, over one pass.
fn one_pass(loader: &mut Loader) -> (std::collections::BTreeMap<usize, Vec<u8>>, u64, Vec<String>) {
    let mut got = std::collections::BTreeMap::new();
    let mut steps = Vec::new();
    let report = loader
        .stream(|step| {
            steps.push(step.name.clone());
            for t in &step.tensors {
                assert!(got.insert(t.index, step.bytes(t).to_vec()).is_none());
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(report.hot_bytes, 0, "no resident hot tier to read");
    assert_streamed_by(&report, loader.options.reads, loader.options.direct);
    (got, report.read_bytes, steps)
}

#[test]
fn a_hot_tier_left_on_disk_streams_every_pass_with_the_same_bytes() {
    use tpde_loader::StepSet;
    for (_d, path) in containers() {
        let c = tpde_pack::Container::open(&path).unwrap();
        let m = &c.manifest;
        for fidelity in [Fidelity::Exact, Fidelity::Base] {
            let resident = stream_all(
                &path,
                LoadOptions {
                    fidelity,
                    ..LoadOptions::default()
                },
            );
            let want: std::collections::BTreeMap<usize, Vec<u8>> = resident
                .into_iter()
                .flat_map(|(_, ts)| ts.into_iter().map(|t| (t.index, t.data)))
                .collect();
            let opts = LoadOptions {
                fidelity,
                hot_resident: false,
                ..LoadOptions::default()
            };
            // (Each job reads its base and its residual: both paths.)
            let mut read_a = 0;
            for reads in [ReadPath::Readers, ReadPath::Jobs] {
                let opts = LoadOptions {
                    reads,
                    ..opts.clone()
                };
                let mut loader = Loader::open(&path, opts).unwrap();
                assert_eq!(loader.memory.hot, 0, "nothing resident");
                let (a, read, _) = one_pass(&mut loader);
                let (b, read_b, _) = one_pass(&mut loader);
                assert!(
                    a == want && b == want,
                    "{}: same bytes as resident ({reads:?})",
                    path.display()
                );
                // Every pass reads the hot bytes again.
                assert_eq!(read, read_b);
                read_a = read;
            }
            let hot = m
                .sections
                .iter()
                .find(|s| s.kind == tpde_format::SectionKind::Hot)
                .map_or(0, |s| s.len);
            assert!(
                read_a >= hot && hot > 0,
                "{read_a} bytes read per pass, hot {hot}"
            );

            // The layers and the rest split the steps between them.
            let part = |steps| {
                let mut l = Loader::open(
                    &path,
                    LoadOptions {
                        steps,
                        ..opts.clone()
                    },
                )
                .unwrap();
                one_pass(&mut l)
            };
            let (layers, _, names) = part(StepSet::Layers);
            assert!(!names.is_empty() && names.iter().all(|n| n.starts_with("layer.")));
            let (outside, _, names) = part(StepSet::OutsideLayers);
            assert!(!names.is_empty() && names.iter().all(|n| !n.starts_with("layer.")));
            let mut both = layers.clone();
            both.extend(outside.clone());
            assert_eq!(both.len(), layers.len() + outside.len(), "disjoint");
            assert!(both == want, "together, every tensor");
        }
        // Without expert shards, tensors held in them are left out.
        if m.experts.is_empty() {
            continue;
        }
        let mut l = Loader::open(
            &path,
            LoadOptions {
                stream_experts: false,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        let mut got = Vec::new();
        l.stream(|step| {
            got.extend(step.tensors.iter().map(|t| t.index));
            Ok(())
        })
        .unwrap();
        let in_shard = |i: usize| {
            let first = match &m.tensors[i].storage {
                tpde_format::Storage::Raw { chunks } => chunks[0].offset,
                tpde_format::Storage::Decomposed { chunks, .. } => chunks[0].base.offset,
            };
            m.experts.iter().any(|x| {
                let s = &m.sections[x.section as usize];
                first >= s.offset && first < s.offset + s.len
            })
        };
        let expected: Vec<usize> = (0..m.tensors.len()).filter(|&i| !in_shard(i)).collect();
        assert!(
            expected.len() < m.tensors.len(),
            "the model has tensors in shards"
        );
        assert_eq!(got, expected);
    }
}

/// A loader of some steps with the hot tier resident (its first pass reads
/// each streamed step's part of the hot tier before the step's other reads,
/// and the part of the steps it leaves out last; its second pass none):
/// both passes deliver the bytes a loader of every step delivers, with one
/// read buffer (each step's reads wait for the step before to be consumed)
/// and with several.
#[test]
fn a_loader_of_some_steps_delivers_the_same_bytes_with_one_read_buffer_or_several() {
    use tpde_loader::StepSet;
    for (_d, path) in containers() {
        let want: std::collections::BTreeMap<usize, Vec<u8>> =
            stream_all(&path, LoadOptions::default())
                .into_iter()
                .flat_map(|(_, ts)| ts.into_iter().map(|t| (t.index, t.data)))
                .collect();
        for steps in [StepSet::Layers, StepSet::OutsideLayers] {
            for (prefetch, reads) in [
                (1, ReadPath::Readers),
                (3, ReadPath::Readers),
                (1, ReadPath::Jobs),
            ] {
                let mut l = Loader::open(
                    &path,
                    LoadOptions {
                        steps,
                        prefetch,
                        reads,
                        ..LoadOptions::default()
                    },
                )
                .unwrap();
                let mut passes = Vec::new();
                for _ in 0..2 {
                    let mut got = std::collections::BTreeMap::new();
                    let report = l
                        .stream(|step| {
                            for t in &step.tensors {
                                got.insert(t.index, step.bytes(t).to_vec());
                            }
                            Ok(())
                        })
                        .unwrap();
                    assert_streamed_by(&report, reads, false);
                    passes.push((got, report.hot_bytes));
                }
                let who = format!("{} {steps:?} prefetch {prefetch} {reads:?}", path.display());
                assert!(!passes[0].0.is_empty(), "{who}: steps delivered");
                assert!(passes[0].0 == passes[1].0, "{who}: passes differ");
                for (i, data) in &passes[0].0 {
                    assert!(want[i] == *data, "{who}: tensor {i} differs");
                }
                assert!(
                    passes[0].1 > 0 && passes[1].1 == 0,
                    "{who}: hot tier read once"
                );
            }
        }
    }
}

/// At base fidelity with `base_blocks`, decomposed tensors arrive as their
/// base blocks, whose values (`q × d`, rounded to the tensor's dtype as the
/// spec's prediction does) are the bytes the default path delivers; every
/// other tensor is delivered as before.
#[test]
fn base_blocks_hold_the_values_the_base_path_delivers() {
    let dtype_bytes = |dtype: &str, v: &[f32]| -> Vec<u8> {
        match dtype {
            "BF16" => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            "F16" => v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            "F32" => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            "F64" => v.iter().flat_map(|x| f64::from(*x).to_le_bytes()).collect(),
            d => panic!("dtype {d}"),
        }
    };
    let mut decomposed = 0;
    for (_d, path) in containers() {
        let base = |blocks| LoadOptions {
            fidelity: Fidelity::Base,
            base_blocks: blocks,
            ..LoadOptions::default()
        };
        let mut values = std::collections::BTreeMap::new();
        Loader::open(&path, base(false))
            .unwrap()
            .stream(|step| {
                for t in &step.tensors {
                    assert!(t.base.is_none());
                    values.insert(t.index, step.bytes(t).to_vec());
                }
                Ok(())
            })
            .unwrap();
        let c = tpde_pack::Container::open(&path).unwrap();
        let mut seen = 0;
        let report = Loader::open(&path, base(true))
            .unwrap()
            .stream(|step| {
                for t in &step.tensors {
                    seen += 1;
                    let got = step.bytes(t);
                    let want = &values[&t.index];
                    let m = &c.manifest.tensors[t.index];
                    match t.base {
                        None => {
                            assert!(m.base_layout().is_none(), "{}", t.name);
                            assert!(got == &want[..], "{}", t.name);
                        }
                        Some(layout) => {
                            decomposed += 1;
                            assert_eq!(got.len() as u64, m.hot_bytes(), "{}", t.name);
                            let rows = (m.shape.iter().product::<u64>() as usize) / layout.cols;
                            let v =
                                tpde_engine::kernels::base_values_f32(&layout, rows, got).unwrap();
                            assert!(dtype_bytes(&t.dtype, &v) == *want, "{}: values", t.name);
                        }
                    }
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, c.manifest.tensors.len());
        assert!(report.delivered_bytes < values.values().map(|v| v.len() as u64).sum::<u64>());
    }
    assert!(decomposed > 0, "the containers have decomposed tensors");
}
