//! UniPC (Zhao et al. 2023, <https://arxiv.org/abs/2302.04867>): a multistep predictor-corrector sampler,
//! in the configuration Wan uses: flow prediction, flow sigmas, data (x₀) prediction, B(h) variants.
//! Follows diffusers' `UniPCMultistepScheduler` step for step, so the same inputs give the same samples.

use std::collections::VecDeque;

use candle_core::{Result, Tensor};

use super::{linspace, shift_sigma, Scheduler, SchedulerConfig};

pub struct UniPc {
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    solver_order: usize,
    /// `bh2` uses B(h) = e^h − 1, `bh1` uses B(h) = h.
    bh2: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    step_index: usize,
    /// The last `solver_order` data predictions, oldest first.
    model_outputs: VecDeque<Tensor>,
    lower_order_nums: usize,
    /// The sample before the last predictor step, which the corrector revisits.
    last_sample: Option<Tensor>,
    this_order: usize,
}

impl UniPc {
    pub fn new(cfg: &SchedulerConfig, steps: usize, shift: f64) -> Self {
        let train = cfg.num_train_timesteps as f64;
        // σ from 1 − linspace(1, 1/T, N+1), shifted, in decreasing order, the final 0 dropped.
        let alphas = linspace(1.0, 1.0 / train, steps + 1);
        let shifted: Vec<f64> = alphas.iter().rev().map(|a| shift_sigma(1.0 - a, shift)).take(steps).collect();
        // diffusers hands the model integer timesteps: σ·T truncated.
        let timesteps = shifted.iter().map(|s| (s * train).trunc() as f32).collect();
        let mut sigmas: Vec<f32> = shifted.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        UniPc {
            sigmas,
            timesteps,
            solver_order: cfg.solver_order,
            bh2: cfg.solver_type == "bh2",
            lower_order_final: cfg.lower_order_final,
            disable_corrector: cfg.disable_corrector.clone(),
            step_index: 0,
            model_outputs: VecDeque::with_capacity(cfg.solver_order),
            lower_order_nums: 0,
            last_sample: None,
            this_order: 1,
        }
    }

    /// λ = log(α/σ) with α = 1 − σ for flow sigmas: the half-log-SNR the solver steps in.
    fn lambda(&self, index: usize) -> f64 {
        let sigma = self.sigmas[index] as f64;
        (1.0 - sigma).ln() - sigma.ln()
    }

    /// The step's coefficients: h, h·φ₁(−h) = e^{−h} − 1, B(h), and the right-hand side `b` of the
    /// order conditions, as in the paper's Algorithm (B(h) variant, data prediction).
    fn coefficients(&self, h: f64, order: usize) -> (f64, f64, Vec<f64>) {
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        (h_phi_1, b_h, b)
    }

    /// `x_t = (σ_t/σ_s)·x − α_t·h·φ₁·m₀ − α_t·B(h)·Σ ρ_k·D_k`, where `D_k = (m_k − m₀)/r_k`.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        x: &Tensor,
        m0: &Tensor,
        target: usize,
        source: usize,
        history: &[(f64, &Tensor)],
        rhos: &[f64],
        h_phi_1: f64,
        b_h: f64,
    ) -> Result<Tensor> {
        let sigma_t = self.sigmas[target] as f64;
        let sigma_s = self.sigmas[source] as f64;
        let alpha_t = 1.0 - sigma_t;
        let mut out = ((x * (sigma_t / sigma_s))? - (m0 * (alpha_t * h_phi_1))?)?;
        for ((rk, mk), rho) in history.iter().zip(rhos) {
            let d = ((*mk - m0)? / *rk)?;
            out = (out - (d * (alpha_t * b_h * rho))?)?;
        }
        Ok(out)
    }

    /// UniP: predicts the sample at the next noise level from the last `order` data predictions.
    fn predict(&self, sample: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.step_index;
        let lambda_s0 = self.lambda(i);
        let h = self.lambda(i + 1) - lambda_s0;
        let n = self.model_outputs.len();
        let m0 = &self.model_outputs[n - 1];
        let history: Vec<(f64, &Tensor)> =
            (1..order).map(|k| ((self.lambda(i - k) - lambda_s0) / h, &self.model_outputs[n - 1 - k])).collect();
        let (h_phi_1, b_h, b) = self.coefficients(h, order);
        let rhos = match order {
            1 => vec![],
            2 => vec![0.5],
            _ => solve(&order_matrix(&history, order - 1), &b[..order - 1]),
        };
        self.update(sample, m0, i + 1, i, &history, &rhos, h_phi_1, b_h)
    }

    /// UniC: corrects the sample just predicted using the model's output at it.
    fn correct(&self, model_t: &Tensor, last_sample: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.step_index;
        let lambda_s0 = self.lambda(i - 1);
        let h = self.lambda(i) - lambda_s0;
        let n = self.model_outputs.len();
        let m0 = &self.model_outputs[n - 1];
        let history: Vec<(f64, &Tensor)> =
            (1..order).map(|k| ((self.lambda(i - k - 1) - lambda_s0) / h, &self.model_outputs[n - 1 - k])).collect();
        let (h_phi_1, b_h, b) = self.coefficients(h, order);
        let rhos = if order == 1 { vec![0.5] } else { solve(&order_matrix(&history, order), &b) };
        let (rho_t, rhos) = rhos.split_last().expect("at least one coefficient");
        let corrected = self.update(last_sample, m0, i, i - 1, &history, rhos, h_phi_1, b_h)?;
        let sigma_t = self.sigmas[i] as f64;
        corrected - ((model_t - m0)? * ((1.0 - sigma_t) * b_h * rho_t))?
    }
}

/// The order conditions' matrix: row j holds r_k^j for the history's ratios and 1 for the newest point.
fn order_matrix(history: &[(f64, &Tensor)], size: usize) -> Vec<Vec<f64>> {
    let ratios: Vec<f64> = history.iter().map(|(r, _)| *r).chain(std::iter::once(1.0)).collect();
    (0..size).map(|j| ratios[..size].iter().map(|r| r.powi(j as i32)).collect()).collect()
}

/// Solves the small dense system `a·x = b` by Gaussian elimination with partial pivoting.
fn solve(a: &[Vec<f64>], b: &[f64]) -> Vec<f64> {
    let n = b.len();
    let mut m: Vec<Vec<f64>> = a.iter().zip(b).map(|(row, &bi)| row.iter().copied().chain([bi]).collect()).collect();
    for col in 0..n {
        let pivot = (col..n).max_by(|&x, &y| m[x][col].abs().total_cmp(&m[y][col].abs())).unwrap_or(col);
        m.swap(col, pivot);
        let (upper, lower) = m.split_at_mut(col + 1);
        let pivot_row = &upper[col];
        for row in lower {
            let f = row[col] / pivot_row[col];
            for (r, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *r -= f * p;
            }
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| m[row][k] * x[k]).sum();
        x[row] = (m[row][n] - s) / m[row][row];
    }
    x
}

impl Scheduler for UniPc {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn set_begin_index(&mut self, index: usize) {
        self.step_index = index;
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let i = self.step_index;
        // Flow prediction: the model's velocity v gives the data prediction x₀ = x − σ·v.
        let x0 = (sample - (model_output * self.sigmas[i] as f64)?)?;
        let use_corrector = i > 0 && !self.disable_corrector.contains(&(i - 1));
        let sample = match (&self.last_sample, use_corrector) {
            (Some(last), true) => self.correct(&x0, last, self.this_order)?,
            _ => sample.clone(),
        };
        if self.model_outputs.len() == self.solver_order {
            self.model_outputs.pop_front();
        }
        self.model_outputs.push_back(x0);
        let order =
            if self.lower_order_final { self.solver_order.min(self.timesteps.len() - i) } else { self.solver_order };
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev = self.predict(&sample, self.this_order)?;
        self.last_sample = Some(sample);
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.solver_order);
        self.step_index += 1;
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wan_schedule_starts_near_one_and_ends_at_zero() {
        let s = UniPc::new(&super::super::tests::wan_config(), 50, 3.0);
        assert_eq!(s.timesteps().len(), 50);
        assert_eq!(s.sigmas().len(), 51);
        assert_eq!(s.timesteps()[0], 999.0);
        assert_eq!(*s.sigmas().last().unwrap(), 0.0);
        assert!(s.sigmas().windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn solve_small_system() {
        let x = solve(&[vec![1.0, 1.0], vec![0.5, 1.0]], &[3.0, 2.0]);
        assert!((x[0] - 2.0).abs() < 1e-12 && (x[1] - 1.0).abs() < 1e-12);
    }
}
