"""What each registered router is, for users choosing one and for serving: `describe()`.

A router is batch-independent when a token's experts depend on no other sequence of the batch.
Expert choice and BASE assign tokens against each other, so they are not; and capacity
dispatch (`model.moe.dispatch=capacity`) makes every router batch-dependent, since whether a
copy is dropped depends on the other tokens of its routing group. That matters in serving:
"Buffer Overflow in Mixture of Experts" (Hayes et al. 2024, arXiv:2402.05526) and "Stealing
User Prompts from Mixture of Experts" (Yona et al. 2024, arXiv:2410.22884) show one request
changing or revealing another's outputs through it.
"""
from __future__ import annotations

from moejax.moe.routing.base import ROUTERS


def describe() -> list[dict]:
  """One row per registered router: name, the paper (the first line of its docstring), causal,
  batch_independent, loss-free balancing (selection bias), dispatch modes, and whether it has
  the plain linear gate W [D, E]."""
  rows = []
  for name in sorted(ROUTERS):
    cls = ROUTERS[name]
    doc = " ".join((cls.__doc__ or "").split())
    rows.append({"router": name, "class": cls.__name__, "paper": doc.split(". ")[0],
                 "causal": cls.causal, "batch_independent": cls.batch_independent,
                 "loss_free_balancing": cls.selection_bias,
                 "dispatch": ", ".join(cls.dispatch_modes), "linear_gate": cls.has_gate})
  return rows


def markdown_table() -> str:
  """`describe()` as the markdown table README.md shows."""
  yes = lambda b: "yes" if b else "no"
  lines = ["| router | causal | batch-independent | loss-free balancing | dispatch |",
           "| --- | --- | --- | --- | --- |"]
  for r in describe():
    lines.append(f"| `{r['router']}` | {yes(r['causal'])} | {yes(r['batch_independent'])} | "
                 f"{yes(r['loss_free_balancing'])} | {r['dispatch']} |")
  return "\n".join(lines)
