"""Tables of scaling-law data points: CSV reading and derived columns (`VAR=EXPR`).

A table is a dict {column name: numpy array}; numeric columns are float64, others str.
Column expressions are arithmetic over columns, with a column named either bare (`loss`) or in
double quotes (`"Training FLOP"`), numbers, + - * / ** and the functions log, log10, exp, sqrt:
`D="Training FLOP"/(6*"Model Size")`. They are parsed with `ast`, never `eval`-ed.
"""
from __future__ import annotations

import ast
import csv
import operator
from typing import Mapping

import numpy as np

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.Pow: operator.pow}
_FUNCS = {"log": np.log, "log10": np.log10, "exp": np.exp, "sqrt": np.sqrt}


def read_csv(path: str) -> dict[str, np.ndarray]:
  """Reads a CSV with a header row; a column is float64 (empty cells NaN) when every non-empty value
  parses as a number, else str."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows:
    raise ValueError(f"data file {path!r} has no rows: expected a header and at least one row")
  table = {}
  for name in rows[0]:
    values = [r[name] for r in rows]
    try:
      table[name] = np.array([float(v) if v.strip() else np.nan for v in values], np.float64)
    except ValueError:
      table[name] = np.array(values)
  return table


def evaluate(expr: str, table: Mapping[str, np.ndarray]) -> np.ndarray:
  """Value [n] of a column expression over `table` (see the module docstring)."""
  try:
    tree = ast.parse(expr.strip(), mode="eval")
  except SyntaxError as e:
    raise ValueError(f"column expression {expr!r} does not parse: {e.msg}") from None

  def column(name):
    if name not in table:
      raise ValueError(f"column expression {expr!r} names column {name!r}: expected one of "
                       f"{sorted(table)}")
    return np.asarray(table[name], np.float64)

  def walk(node):
    if isinstance(node, ast.Expression):
      return walk(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      return column(node.value)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
      return float(node.value)
    if isinstance(node, ast.Name):
      return column(node.id)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
      return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
      v = walk(node.operand)
      return -v if isinstance(node.op, ast.USub) else v
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCS and len(node.args) == 1 and not node.keywords):
      return _FUNCS[node.func.id](walk(node.args[0]))
    raise ValueError(f"column expression {expr!r} uses {ast.dump(node)[:40]}...: allowed are "
                     f"columns, numbers, + - * / ** and {sorted(_FUNCS)}")

  return walk(tree)


def add_columns(table: Mapping[str, np.ndarray], specs: list[str]) -> dict[str, np.ndarray]:
  """Returns a copy of `table` with a column per `VAR=EXPR` in `specs` (applied in order)."""
  out = dict(table)
  for spec in specs:
    name, sep, expr = spec.partition("=")
    if not sep or not name.strip():
      raise ValueError(f"--column {spec!r} is not allowed: expected VAR=EXPR")
    out[name.strip()] = np.broadcast_to(evaluate(expr, out), len(next(iter(table.values())))).copy()
  return out


def select(table: Mapping[str, np.ndarray], where: Mapping[str, str]) -> dict[str, np.ndarray]:
  """Rows whose column equals the given value (numbers compared as floats)."""
  mask = np.ones(len(next(iter(table.values()))), bool)
  for col, value in where.items():
    if col not in table:
      raise ValueError(f"--where column {col!r} is not allowed: expected one of {sorted(table)}")
    v = table[col]
    mask &= (v == float(value)) if v.dtype.kind == "f" else (v == value)
  return {k: v[mask] for k, v in table.items()}
