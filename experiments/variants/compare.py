"""The expert-variant comparison of issue 13: the conditional-compute and expert-architecture
variants of `moejax.moe.variants` (and the sparse layer's options) trained like the router
comparison (experiments/routers/compare.py), with the same columns, budget, seeds and report.

Same budget and data as the router comparison: every run trains `steps` steps of the default batch
(16 x 64 tokens) of the synthetic data (data.seed 0) on the 8-device data mesh, from the default
config (8 experts of width 128, top-2) changed only as each variant says. Compute per token is
not the same for every variant, by design (that is what several of them change): the table's
`experts/token` column is the expert FFNs each routed token ran (after null and zero-computation
experts and drops) and `tokens/s` the measured speed, so loss is read against both.

Findings (`findings`): the headline claims that a run of this size can test:
1. Chain-of-Experts (arXiv:2506.18945): 2 iterations of top-1 against top-2 (equal compute) and
   against top-2 of twice the experts; and with fine-grained experts as the paper (2 iterations
   of top-8 of 64 against top-16 of 64).
2. Zero-computation experts (MoE++, arXiv:2410.07348; AdaMoE, arXiv:2406.13233): fewer expert
   FFNs per token at equal or better loss.
3. Mixture-of-Depths (arXiv:2404.02258): more tokens/s at a small loss cost.

    python experiments/variants/compare.py                 # ~30 min on 2 CPU cores
    python experiments/variants/compare.py --only coe,topk
    python experiments/variants/compare.py --report_only
    python experiments/variants/compare.py --budget tiny   # seconds per run: trying the script

Resumable: runs in `runs/<variant>_s<seed>` (not committed), one row of `results.csv` each.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Iterable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# The router comparison's machinery (runs, rows, table, plots); it sets the simulated devices
# before jax is imported.
_spec = importlib.util.spec_from_file_location(
    "router_compare", os.path.join(ROOT, "experiments", "routers", "compare.py"))
rc = importlib.util.module_from_spec(_spec)
sys.modules["router_compare"] = rc       # dataclasses look their module up while defining
_spec.loader.exec_module(rc)
Variant = rc.Variant

VARIANTS = (
    Variant("topk", "topk", note="the sparse layer: softmax top-2 of 8 (the reference)"),
    Variant("topk_e16", "topk", (("model.moe.num_experts", 16),),
            note="top-2 of 16 experts (2x expert parameters, same compute)"),
    Variant("coe", "topk", (("model.moe.chain_iterations", 2), ("model.moe.top_k", 1)),
            note="Chain-of-Experts: 2 iterations of top-1 (same compute as top-2)"),
    Variant("topk_g8", "topk", (("model.moe.granularity", 8),),
            note="fine-grained: top-16 of 64 experts of width 16 (same compute)"),
    Variant("coe_g8", "topk", (("model.moe.granularity", 8), ("model.moe.chain_iterations", 2),
                               ("model.moe.top_k", 1)),
            note="Chain-of-Experts as the paper: 2 iterations of top-8 of 64 (same compute)"),
    Variant("adamoe", "topk", (("model.moe.null_experts", 8), ("model.moe.top_k", 3)),
            note="AdaMoE: top-3 of 8 experts + 8 null experts"),
    Variant("moe_plus_plus", "topk",
            (("model.moe.extra_experts", ("zero", "copy", "constant")),
             ("model.moe.gating_residual", True)),
            note="MoE++: + zero, copy, constant experts; gating residuals"),
    Variant("rmoe", "rmoe", note="layerwise recurrent (GRU) router"),
    Variant("rexmoe", "topk", (("model.moe.layer", "rexmoe"),),
            note="ReXMoE: routers pick among the neighbouring layers' experts too"),
    Variant("aoe", "topk", (("model.moe.layer", "aoe"),),
            note="Autonomy-of-Experts: no router, experts chosen by their own norms"),
    Variant("hmoe", "topk",
            (("model.moe.expert_widths", (64, 64, 96, 96, 160, 160, 192, 192)),
             ("model.moe.lb_loss_weight", 0.0), ("model.moe.param_penalty_weight", 0.01)),
            note="HMoE: expert widths 64-192 (same total width), P-Penalty in place of the "
                 "Switch loss"),
    Variant("mh_moe", "topk", (("model.moe.layer", "multi_head"), ("model.moe.mh_heads", 2)),
            note="MH-MoE: 2 sub-tokens per token"),
    Variant("peer", "topk", (("model.moe.layer", "peer"), ("model.moe.peer_experts", 64 ** 2)),
            note="PEER: product keys over 64^2 single-neuron experts, 8 heads x top-16 "
                 "(2^14 took ~20 min a run here)"),
    Variant("smear", "topk", (("model.moe.layer", "smear"),),
            note="SMEAR, causal prefix merging (E expert FFNs per token)"),
    Variant("mot", "topk", (("model.moe.layer", "mot"),),
            note="Mixture of Tokens: groups of 4 sequences (batch-dependent)"),
    Variant("soft", "topk", (("model.moe.layer", "soft"), ("model.moe.soft_slots_per_expert", 16)),
            note="Soft MoE, 16 slots per expert (2 FFNs per token): NOT causal, its LM loss "
                 "leaks the future"),
    Variant("mod", "topk", (("model.mod_capacity", 0.5), ("model.mod_every", 2)),
            note="Mixture-of-Depths: every 2nd block takes half the tokens"),
)

BUDGETS = {"default": rc.Budget(steps=500, overrides=(("mesh.data", rc.NUM_DEVICES),)),
           "tiny": rc.BUDGETS["tiny"]}


def findings(rows: list[dict]) -> list[str]:
  """The headline checks of the module docstring, each with its numbers and a verdict."""
  g = rc.by_variant(rows, VARIANTS)
  mean = lambda v, k: rc._mean_std(g[v], k)[0]
  # Seed-to-seed spread when there are several seeds; at least 0.005 nats.
  noise = lambda *vs: max([rc._spread(g[v], "eval_loss") for v in vs] + [0.005])
  lines = []
  if all(v in g for v in ("coe", "topk", "topk_e16")):
    d, d16 = (mean("coe", "eval_loss") - mean(v, "eval_loss") for v in ("topk", "topk_e16"))
    n = noise("coe", "topk", "topk_e16")
    verdict = ("agrees: lower loss than both" if d < -n and d16 < -n else
               "half: lower loss than top-2 of 8, not than top-2 of 16" if d < -n else
               "no clear difference (within noise)" if abs(d) <= n else
               "does not agree: chain-of-experts is worse")
    lines.append(
        f"1. Chain-of-Experts (Wang et al. 2025, arXiv:2506.18945): 2 iterations beat top-k at "
        f"equal compute and match more experts. Eval loss: CoE {mean('coe', 'eval_loss'):.4f}, "
        f"top-2 of 8 {mean('topk', 'eval_loss'):.4f} ({d:+.4f}), top-2 of 16 "
        f"{mean('topk_e16', 'eval_loss'):.4f} ({d16:+.4f}); experts/token "
        f"{mean('coe', 'experts_per_token'):.2f} vs {mean('topk', 'experts_per_token'):.2f}; "
        f"noise allowance {n:.4f}. Verdict: {verdict}.")
  if all(v in g for v in ("coe_g8", "topk_g8")):
    d = mean("coe_g8", "eval_loss") - mean("topk_g8", "eval_loss")
    n = noise("coe_g8", "topk_g8")
    lines.append(
        f"{len(lines) + 1}. The same with fine-grained experts, as the paper's CoE-2(4/64) vs "
        f"MoE(8/64): 2 iterations of top-8 of 64 against top-16 of 64. Eval loss "
        f"{mean('coe_g8', 'eval_loss'):.4f} vs {mean('topk_g8', 'eval_loss'):.4f} ({d:+.4f}; "
        f"noise {n:.4f}). Verdict: " + ("agrees" if d < -n else "no clear difference"
                                        if abs(d) <= n else "does not agree") + ".")
  for name, paper in (("moe_plus_plus", "MoE++ (Jin et al. 2024, arXiv:2410.07348)"),
                      ("adamoe", "AdaMoE (Zeng et al. 2024, arXiv:2406.13233)")):
    if name in g and "topk" in g:
      d = mean(name, "eval_loss") - mean("topk", "eval_loss")
      e, e0 = mean(name, "experts_per_token"), mean("topk", "experts_per_token")
      n = noise(name, "topk")
      verdict = ("agrees: fewer expert FFNs per token, loss equal or better" if e < e0 and d <= n
                 else "half: fewer expert FFNs per token, but worse loss" if e < e0 else
                 "does not agree: no fewer expert FFNs per token")
      lines.append(
          f"{len(lines) + 1}. {paper}: zero-computation experts save expert FFNs at equal loss. "
          f"Expert FFNs per routed token {e:.2f} vs {e0:.2f}; eval loss "
          f"{mean(name, 'eval_loss'):.4f} vs {mean('topk', 'eval_loss'):.4f} ({d:+.4f}; noise "
          f"{n:.4f}); tokens/s {mean(name, 'tokens_per_s'):,.0f} vs "
          f"{mean('topk', 'tokens_per_s'):,.0f}. Verdict: {verdict}.")
  if "mod" in g and "topk" in g:
    d = mean("mod", "eval_loss") - mean("topk", "eval_loss")
    speed = mean("mod", "tokens_per_s") / mean("topk", "tokens_per_s")
    lines.append(
        f"{len(lines) + 1}. Mixture-of-Depths (Raposo et al. 2024, arXiv:2404.02258): faster "
        f"steps at a small loss cost. tokens/s {speed:.2f}x the sparse model's; eval loss "
        f"{mean('mod', 'eval_loss'):.4f} vs {mean('topk', 'eval_loss'):.4f} ({d:+.4f}). Verdict: "
        + ("agrees" if speed > 1.05 and d <= 0.05 else
           "faster, with a loss cost above 0.05 nats" if speed > 1.05 else
           "not faster at this size (tokens/s within the spread of runs on shared cores)") + ".")
  return lines


def write_report(results_path: str, out_dir: str, runs_dir: str) -> list[str]:
  """results.md (table and findings), plots/bars.png and moejax.plot's overlays of the first
  seed's runs; returns the paths written."""
  from moejax.plot import plot_runs  # noqa: PLC0415
  rows = rc.read_results(results_path)
  md = os.path.join(out_dir, "results.md")
  with open(md, "w") as f:
    f.write(f"# Expert-variant comparison (issue 13)\n\nWritten by "
            f"`experiments/variants/compare.py` from `{os.path.basename(results_path)}`; "
            f"{int(rows[0]['steps'])} steps of {int(rows[0]['tokens'] / rows[0]['steps'])} tokens "
            "per run. Columns as in experiments/routers/results.md: means over seeds; MaxVio, "
            "dropped and experts/token over the last quarter of training; speed-up: top-k's "
            "steps / this run's steps to top-k's final eval loss.\n\n")
    f.write(rc.markdown_table(rows, VARIANTS) + "\n\n## Findings\n\n")
    f.write("\n".join(findings(rows)) + "\n")
  plots = os.path.join(out_dir, "plots")
  os.makedirs(plots, exist_ok=True)
  paths = [md, rc.plot_bars(rows, os.path.join(plots, "bars.png"), VARIANTS,
                            title="expert-variant comparison")]
  first_seed = min(int(r["seed"]) for r in rows)
  workdirs = [os.path.join(runs_dir, r["name"]) for r in rows if int(r["seed"]) == first_seed]
  workdirs = [w for w in workdirs if os.path.exists(os.path.join(w, "metrics.jsonl"))]
  if workdirs:
    paths += plot_runs(workdirs, plots)
  return paths


def main(argv: Iterable[str] | None = None) -> int:
  return rc.cli(argv, description=__doc__.split("\n")[0], variants=VARIANTS, budgets=BUDGETS,
                report=write_report, findings_of=findings, here=HERE)


if __name__ == "__main__":
  sys.exit(main())
