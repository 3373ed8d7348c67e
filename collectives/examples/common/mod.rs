//! Model code shared by the examples and by `tests/examples.rs`, which
//! includes this file to recompute each example on one process.
#![allow(dead_code)]

/// A deterministic generator (SplitMix64), so every rank builds the same data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

pub const DIM: usize = 16;
pub const BATCH: usize = 96;
pub const STEPS: usize = 40;
pub const LR: f32 = 0.5;

/// Batch `step` of a synthetic, linearly separable-ish classification task:
/// rows of `DIM` features and labels in {0, 1}.
pub fn batch(step: usize) -> (Vec<f32>, Vec<f32>) {
    let mut truth = Rng(7);
    let w_true: Vec<f32> = (0..DIM).map(|_| truth.uniform() * 2.0).collect();
    let mut rng = Rng(1000 + step as u64);
    let mut xs = Vec::with_capacity(BATCH * DIM);
    let mut ys = Vec::with_capacity(BATCH);
    for _ in 0..BATCH {
        let x: Vec<f32> = (0..DIM).map(|_| rng.uniform()).collect();
        let z: f32 = x.iter().zip(&w_true).map(|(a, b)| a * b).sum::<f32>() + 0.3;
        let noise = rng.uniform() * 0.3;
        ys.push(if z + noise > 0.0 { 1.0 } else { 0.0 });
        xs.extend(x);
    }
    (xs, ys)
}

/// Logistic regression: weights and bias.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub w: Vec<f32>,
    pub b: f32,
}

impl Model {
    pub fn new() -> Model {
        Model {
            w: vec![0.0; DIM],
            b: 0.0,
        }
    }

    /// Mean gradient (weights, bias) and mean loss over rows `rows` of a batch.
    pub fn grad(
        &self,
        xs: &[f32],
        ys: &[f32],
        rows: std::ops::Range<usize>,
    ) -> (Vec<f32>, f32, f32) {
        let n = rows.len() as f32;
        let mut gw = [0.0f32; DIM];
        let mut gb = 0.0f32;
        let mut loss = 0.0f32;
        for i in rows {
            let x = &xs[i * DIM..(i + 1) * DIM];
            let z: f32 = x.iter().zip(&self.w).map(|(a, b)| a * b).sum::<f32>() + self.b;
            let p = 1.0 / (1.0 + (-z).exp());
            let e = p - ys[i];
            for (g, a) in gw.iter_mut().zip(x) {
                *g += e * a;
            }
            gb += e;
            loss -= ys[i] * p.max(1e-7).ln() + (1.0 - ys[i]) * (1.0 - p).max(1e-7).ln();
        }
        (gw.iter().map(|g| g / n).collect(), gb / n, loss / n)
    }

    pub fn step(&mut self, gw: &[f32], gb: f32, lr: f32) {
        for (w, g) in self.w.iter_mut().zip(gw) {
            *w -= lr * g;
        }
        self.b -= lr * gb;
    }

    /// Weights then bias, as the examples print them.
    pub fn params(&self) -> Vec<f32> {
        let mut p = self.w.clone();
        p.push(self.b);
        p
    }
}

/// Rows of a batch that rank `rank` of `world` trains on.
pub fn shard(rank: usize, world: usize) -> std::ops::Range<usize> {
    let per = BATCH / world;
    rank * per..(rank + 1) * per
}

/// Single-process training on whole batches: (model, first loss, last loss).
pub fn dsgd_reference() -> (Model, f32, f32) {
    let mut m = Model::new();
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let (xs, ys) = batch(step);
        let (gw, gb, loss) = m.grad(&xs, &ys, 0..BATCH);
        m.step(&gw, gb, LR);
        losses.push(loss);
    }
    (m, losses[0], losses[STEPS - 1])
}

pub const LOCAL_STEPS: usize = 4;
pub const ROUNDS: usize = 8;

/// Model averaging: `LOCAL_STEPS` local steps on its shard of each batch,
/// then every rank's parameters are averaged. The single-process version
/// runs the `world` replicas one after the other.
pub fn local_round(m: &mut Model, round: usize, rank: usize, world: usize) {
    for k in 0..LOCAL_STEPS {
        let (xs, ys) = batch(round * LOCAL_STEPS + k);
        let (gw, gb, _) = m.grad(&xs, &ys, shard(rank, world));
        m.step(&gw, gb, LR);
    }
}

pub fn averaging_reference(world: usize) -> Model {
    let mut m = Model::new();
    for round in 0..ROUNDS {
        let replicas: Vec<Model> = (0..world)
            .map(|r| {
                let mut local = m.clone();
                local_round(&mut local, round, r, world);
                local
            })
            .collect();
        for i in 0..DIM {
            m.w[i] = replicas.iter().map(|r| r.w[i]).sum::<f32>() / world as f32;
        }
        m.b = replicas.iter().map(|r| r.b).sum::<f32>() / world as f32;
    }
    m
}

pub const POINTS: usize = 600;
pub const K: usize = 4;
pub const ITERS: usize = 10;

/// 2-D points around `K` centres.
pub fn points() -> Vec<[f64; 2]> {
    points_n(POINTS)
}

/// `n` 2-D points around `K` centres (the first `POINTS` are `points()`).
/// Every coordinate is a multiple of 2^-22 below 8 in magnitude, so sums of
/// fewer than 2^28 of them are exact in f64, in any order.
pub fn points_n(n: usize) -> Vec<[f64; 2]> {
    let centres = [[-5.0, -5.0], [5.0, -4.0], [-4.0, 6.0], [6.0, 5.0]];
    let mut rng = Rng(42);
    (0..n)
        .map(|i| {
            let c = centres[(rng.next_u64() % K as u64) as usize];
            let _ = i;
            [
                c[0] + 2.0 * f64::from(rng.uniform()),
                c[1] + 2.0 * f64::from(rng.uniform()),
            ]
        })
        .collect()
}

/// Per-centroid coordinate sums (x, y interleaved) and counts of the points
/// `pts` whose nearest centroid it is.
pub fn assign(centroids: &[[f64; 2]], pts: &[[f64; 2]]) -> (Vec<f64>, Vec<u64>) {
    let mut sums = vec![0.0f64; 2 * centroids.len()];
    let mut counts = vec![0u64; centroids.len()];
    for p in pts {
        let best = nearest(centroids, p);
        sums[2 * best] += p[0];
        sums[2 * best + 1] += p[1];
        counts[best] += 1;
    }
    (sums, counts)
}

/// The index of the centroid nearest `p` (the first of equals).
pub fn nearest(centroids: &[[f64; 2]], p: &[f64; 2]) -> usize {
    let d = |c: &[f64; 2]| (c[0] - p[0]).powi(2) + (c[1] - p[1]).powi(2);
    let mut best = 0;
    for (j, c) in centroids.iter().enumerate() {
        if d(c) < d(&centroids[best]) {
            best = j;
        }
    }
    best
}

/// New centroids from sums and counts (an empty cluster keeps its centroid).
pub fn update(centroids: &mut [[f64; 2]], sums: &[f64], counts: &[u64]) {
    for (j, c) in centroids.iter_mut().enumerate() {
        if counts[j] > 0 {
            *c = [
                sums[2 * j] / counts[j] as f64,
                sums[2 * j + 1] / counts[j] as f64,
            ];
        }
    }
}

/// The points rank `rank` of `world` owns.
pub fn my_points(pts: &[[f64; 2]], rank: usize, world: usize) -> Vec<[f64; 2]> {
    pts.iter()
        .enumerate()
        .filter(|(i, _)| i % world == rank)
        .map(|(_, p)| *p)
        .collect()
}

pub fn initial_centroids(pts: &[[f64; 2]]) -> Vec<[f64; 2]> {
    pts[..K].to_vec()
}

pub fn kmeans_reference() -> Vec<[f64; 2]> {
    let pts = points();
    let mut c = initial_centroids(&pts);
    for _ in 0..ITERS {
        let (s, n) = assign(&c, &pts);
        update(&mut c, &s, &n);
    }
    c
}

pub const MAX_ITERS: usize = 100;

/// Lloyd iterations until no centroid moves (at most `MAX_ITERS`), where
/// `sums_counts` gives the summed `assign` of every point for the given
/// centroids (on one process: `assign` of all of them). Returns the number
/// of iterations.
pub fn lloyd<E>(
    centroids: &mut [[f64; 2]],
    mut sums_counts: impl FnMut(&[[f64; 2]]) -> Result<(Vec<f64>, Vec<u64>), E>,
) -> Result<usize, E> {
    for it in 1..=MAX_ITERS {
        let (sums, counts) = sums_counts(centroids)?;
        let before = centroids.to_vec();
        update(centroids, &sums, &counts);
        if centroids == before.as_slice() {
            return Ok(it);
        }
    }
    Ok(MAX_ITERS)
}

/// The nearest centroid of each point.
pub fn labels(centroids: &[[f64; 2]], pts: &[[f64; 2]]) -> Vec<u32> {
    pts.iter().map(|p| nearest(centroids, p) as u32).collect()
}

/// Single-process k-means of `pts` until it converges, from the first `K`
/// points: (centroids, labels, iterations).
pub fn kmeans_until_stable(pts: &[[f64; 2]]) -> (Vec<[f64; 2]>, Vec<u32>, usize) {
    let mut c = initial_centroids(pts);
    let Ok(iters) = lloyd(&mut c, |c| {
        Ok::<_, std::convert::Infallible>(assign(c, pts))
    });
    let l = labels(&c, pts);
    (c, l, iters)
}

/// Points per rank when `n` are dealt out in consecutive blocks: the first
/// `n % world` ranks get one more.
pub fn block_counts(n: usize, world: usize) -> Vec<usize> {
    (0..world)
        .map(|p| n / world + usize::from(p < n % world))
        .collect()
}

/// The line every example ends with: `final v1 v2 ...` (shortest exact decimals).
pub fn final_line<T: std::fmt::Display>(values: &[T]) -> String {
    let v: Vec<String> = values.iter().map(|x| x.to_string()).collect();
    format!("final {}", v.join(" "))
}
