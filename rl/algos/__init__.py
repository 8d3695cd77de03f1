"""Pure RL math of vlrl: advantages, PPO/GRPO losses, KL, loss aggregation. Plain functions on
tensors; no model, no config object, no ray / vllm / torch.distributed.

Papers: PPO 1707.06347, GAE 1506.02438, GRPO 2402.03300, Dr.GRPO 2503.20783, DAPO 2503.14476,
VC-PPO 2503.01491, VAPO 2504.05118, dual-clip PPO 1912.09729, KL estimators (Schulman, "Approximating
KL Divergence", 2020).

Departures from the papers (each on purpose):
- GAE ends every episode at the last response token: nothing is bootstrapped past it, also for
  responses cut at the length limit (the papers' GAE would bootstrap V(s_T) for a truncation).
  Masked positions inside a response are passed over, not treated as episode ends.
- Length-adaptive lambda 1 - 1/(alpha*l) (VAPO) is clamped to [0, 1]: the formula goes negative
  for l < 1/alpha (20 tokens at alpha = 0.05).
- PPO: log(pi/pi_old) is clamped to [-20, 20] before exp (numerical guard). Dual clip applies to
  negative advantages only, as in 1912.09729.
- k3 KL: the log-ratio is clamped to [-20, 20] and the estimate to <= 10 (numerical guard; it
  makes the estimator biased only for absurd ratios).
- KL coefficient per sample (by task, Seed1.5-VL) instead of one global beta; in the reward it is
  k1 per token (InstructGPT), in the loss k3 (GRPO) aggregated like every loss (token-mean by
  default, where GRPO averages per sequence first).
- Value loss: 1/2 * max(unclipped, clipped) squared error with the clip range around the old
  values (OpenAI baselines), not the plain squared error of PPO eq. 9.
- GRPO normalises by the unbiased group std plus eps; a group of one sample gets advantage 0.
- seq_mean_* aggregation averages over sequences that have at least one response token, so an
  all-padding row changes nothing.
- DAPO dynamic sampling is only the mask here; over-sampling to refill the batch is the driver's.
- The positive-example LM loss (VAPO) is returned unweighted; the caller multiplies by mu.
- `whiten` uses the population variance.
"""
from rl.algos.advantages import (
                                 decoupled_gae,
                                 dynamic_sampling_mask,
                                 gae,
                                 group_advantages,
                                 length_adaptive_lambda,
                                 token_rewards_from_scores,
                                 whiten,
                                 whiten_by_group,
)
from rl.algos.aggregate import Agg, aggregate, masked_mean, masked_sum
from rl.algos.kl import KLKind, kl, kl_coefs, kl_loss, kl_penalty_rewards
from rl.algos.losses import (
                                 explained_variance,
                                 policy_loss,
                                 positive_lm_loss,
                                 truncated_is_weight,
                                 value_loss,
)

__all__ = [
    "Agg", "KLKind",
    "aggregate", "masked_mean", "masked_sum",
    "gae", "decoupled_gae", "length_adaptive_lambda", "whiten", "whiten_by_group", "group_advantages",
    "dynamic_sampling_mask",
    "token_rewards_from_scores",
    "kl", "kl_coefs", "kl_penalty_rewards", "kl_loss",
    "policy_loss", "value_loss", "explained_variance", "positive_lm_loss", "truncated_is_weight",
]
