"""Valuation: In-Run Data Shapley of every optimizer step, and the recorder that writes it to the store.

* :mod:`~inrun.valuation.update_rules`: how an optimizer turns per-sample contributions into updates (SGD family
  exactly, Adam/AdamW by the fixed-state rule);
* :mod:`~inrun.valuation.validation`: the validation set and its gradients (the utility the values measure);
* :mod:`~inrun.valuation.shapley`: first- and second-order values of one step (ALGORITHMS.md);
* :mod:`~inrun.valuation.recorder`: :class:`InRunRecorder`, the framework-free driver (hooks, valuation, store,
  resume state) that every integration calls.
"""

from inrun.valuation.recorder import InRunRecorder
from inrun.valuation.shapley import StepValues, value_step
from inrun.valuation.update_rules import UpdateTerms, rule_name, update_terms
from inrun.valuation.validation import ValidationSet

__all__ = ["InRunRecorder", "StepValues", "UpdateTerms", "ValidationSet", "rule_name", "update_terms", "value_step"]
