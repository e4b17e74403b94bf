//! `tpde run`: generate text with a packed model.

use std::io::Write;
use std::path::Path;
use tpde_engine::generate::{generate, Sampler};
use tpde_engine::model::Model;
use tpde_engine::tokenizer::TextStream;
use tpde_pack::Error;

/// The most a chat template's rendering may allocate: real templates take
/// kilobytes (its output is capped at 16 MiB, and so is each string a
/// filter builds).
const TEMPLATE_MEMORY: usize = 256 << 20;

pub struct RunOptions {
    pub load: tpde_loader::LoadOptions,
    pub prompt: String,
    pub tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub raw: bool,
    pub json: bool,
}

pub fn run(path: &Path, opts: &RunOptions) -> anyhow::Result<()> {
    if !(opts.temperature.is_finite() && opts.temperature >= 0.0) {
        anyhow::bail!(
            "--temperature must be a number ≥ 0, not {}",
            opts.temperature
        );
    }
    if !(opts.top_p > 0.0 && opts.top_p <= 1.0) {
        anyhow::bail!("--top-p must be in (0, 1], not {}", opts.top_p);
    }
    // Room for the prompt as the chat template renders it (a token holds
    // at least one byte) and the reply.
    let ctx = opts.prompt.len() + 256 + opts.tokens;
    let (model, meta, load) = Model::load(path, opts.load.clone(), ctx)?;
    let Some((tok, chat)) = meta.tokenizer(path)? else {
        return Err(
            Error::input(path, "the model carries no tokenizer: tpde run needs one").into(),
        );
    };
    let text = match (&chat, opts.raw) {
        (Some(t), false) => {
            let piece = |id: Option<u32>| {
                id.map(|i| String::from_utf8_lossy(tok.token_bytes(i)).into_owned())
                    .unwrap_or_default()
            };
            // The template comes from the model's files: its rendering is
            // bounded in time (fuel) and, here, in memory.
            let over = format!(
                "{}: chat template: needs more than {} MiB of memory",
                path.display(),
                TEMPLATE_MEMORY >> 20
            );
            crate::budget::within(TEMPLATE_MEMORY, &over, || {
                t.render(
                    &[("user", &opts.prompt)],
                    true,
                    &piece(tok.bos()),
                    &piece(tok.eos()),
                )
            })
            .map_err(|m| Error::input(path, format!("chat template: {m}")))?
        }
        _ => opts.prompt.clone(),
    };
    let mut ids = Vec::new();
    if tok.add_bos() {
        ids.extend(tok.bos());
    }
    ids.extend(tok.encode(&text, true));
    if ids.is_empty() {
        return Err(Error::input(path, "the prompt is empty").into());
    }
    // End-of-generation tokens: the model's end of sequence, and the
    // control tokens that close a turn.
    let mut stop: Vec<u32> = tok.eos().into_iter().collect();
    for s in [
        "<|im_end|>",
        "<|endoftext|>",
        "<|eot_id|>",
        "<|end|>",
        "</s>",
    ] {
        if let Some(id) = tok.token_id(s).filter(|&i| tok.is_control(i)) {
            stop.push(id);
        }
    }
    let ctx = (ids.len() + opts.tokens).min(model.config.ctx_len);
    let mut session = model.session(ctx);
    let mut sampler = Sampler::new(opts.temperature, opts.top_p, opts.seed);
    let mut out = std::io::stdout().lock();
    let mut stream = TextStream::new();
    let mut write_err = None;
    let g = generate(&mut session, &ids, opts.tokens, &mut sampler, &stop, |t| {
        if stop.contains(&t) {
            return;
        }
        let s = stream.push(tok.token_bytes(t));
        if let Err(e) = out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
            write_err.get_or_insert(e);
        }
    })
    .map_err(|m| Error::input(path, m))?;
    let rest = stream.finish();
    writeln!(out, "{rest}")?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    let gen_tps = (g.tokens.len().saturating_sub(1)) as f64 / g.gen_seconds.max(1e-9);
    if opts.json {
        let j = serde_json::json!({
            "prompt_tokens": g.prompt_tokens,
            "generated_tokens": g.tokens.len(),
            "stopped": g.stopped,
            "load_seconds": load.seconds,
            "ttft_ms": g.ttft_seconds * 1e3,
            "tg_tps": gen_tps,
            "token_ids": g.tokens,
            "placement": load.placement,
            "stream": model.stream_stats(),
        });
        eprintln!("{j}");
    } else {
        eprintln!(
            "tpde run: load {:.2} s · prompt {} tokens · first token {:.0} ms · {} tokens at {:.1} tok/s",
            load.seconds,
            g.prompt_tokens,
            g.ttft_seconds * 1e3,
            g.tokens.len(),
            gen_tps
        );
        if let Some(st) = model.stream_stats() {
            let passes = st.passes.max(1);
            eprintln!(
                "tpde run: layers streamed per token: {} passes, {:.1} MB read a pass{}",
                st.passes,
                st.bytes() as f64 / passes as f64 / 1e6,
                match st.cache.hit_rate() {
                    Some(h) => format!(", expert cache {:.1} % hits", h * 100.0),
                    None => String::new(),
                }
            );
        }
    }
    Ok(())
}
