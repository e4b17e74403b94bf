//! Sampling and text generation.

use crate::model::Session;
use std::time::Instant;

/// How the next token is chosen.
#[derive(Clone, Debug)]
pub struct Sampler {
    /// 0: greedy (the most likely token).
    pub temperature: f32,
    /// Nucleus: sample among the most likely tokens whose probabilities
    /// add up to at least this (1: all).
    pub top_p: f32,
    rng: u64,
}

impl Sampler {
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Sampler {
        Sampler {
            temperature,
            top_p,
            rng: seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// splitmix64, as a uniform value in [0, 1).
    fn uniform(&mut self) -> f32 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut p: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / self.temperature).exp()))
            .collect();
        let total: f32 = p.iter().map(|x| x.1).sum();
        p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut keep = 0;
        let mut cum = 0.0;
        for (_, w) in &p {
            keep += 1;
            cum += w / total;
            if cum >= self.top_p {
                break;
            }
        }
        p.truncate(keep.max(1));
        let kept: f32 = p.iter().map(|x| x.1).sum();
        let mut r = self.uniform() * kept;
        for &(id, w) in &p {
            if r < w {
                return id;
            }
            r -= w;
        }
        p.last().map_or(0, |x| x.0)
    }
}

/// The index of the largest value (the first of equals).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// What a generation did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Generation {
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    /// Prompt processing until the first token was chosen.
    pub ttft_seconds: f64,
    /// Every later token.
    pub gen_seconds: f64,
    /// Whether a stop token ended it (rather than the count).
    pub stopped: bool,
}

/// Runs `prompt`, then generates up to `n` tokens, calling `on_token` with
/// each as soon as it is chosen; stops after a token in `stop`.
pub fn generate(
    session: &mut Session,
    prompt: &[u32],
    n: usize,
    sampler: &mut Sampler,
    stop: &[u32],
    mut on_token: impl FnMut(u32),
) -> Result<Generation, String> {
    let t0 = Instant::now();
    let mut g = Generation {
        prompt_tokens: prompt.len(),
        ..Generation::default()
    };
    if n == 0 {
        return Ok(g);
    }
    let mut logits = session.forward(prompt, false)?;
    let mut t1 = Instant::now();
    for i in 0..n {
        let tok = sampler.sample(&logits);
        if i == 0 {
            t1 = Instant::now();
            g.ttft_seconds = (t1 - t0).as_secs_f64();
        }
        g.tokens.push(tok);
        on_token(tok);
        if stop.contains(&tok) {
            g.stopped = true;
            break;
        }
        if i + 1 == n || session.position() >= session.context() {
            break;
        }
        logits = session.forward(&[tok], false)?;
    }
    g.gen_seconds = t1.elapsed().as_secs_f64();
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(0.0, 1.0, 1);
        assert_eq!(s.sample(&[0.0, 3.0, 3.0, 1.0]), 1);
    }

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        // Token 2 holds ~0.9998 of the mass: top-p 0.5 must always pick it.
        let mut s = Sampler::new(1.0, 0.5, 42);
        for _ in 0..200 {
            assert_eq!(s.sample(&[0.0, 1.0, 10.0, 0.5]), 2);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut s = Sampler::new(1.0, 1.0, 7);
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let n = 20_000;
        let ones = (0..n).filter(|_| s.sample(&logits) == 1).count();
        let f = ones as f64 / n as f64;
        assert!((f - 0.75).abs() < 0.02, "{f}");
    }
}
