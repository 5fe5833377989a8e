"""autocompress.search: budgets, cost model, baselines and the Optuna study behind ``autocompress search``.

Example::

    from autocompress.search import SearchSettings, search
    result = search(SearchSettings("runs/x", ("avg-bits=3.5",), trials=200))
    result.trial(result.best).measured_kl
"""
from .budget import Budget
from .cost import DEVICES, CostModel
from .result import SearchResult, TrialRecord
from .study import SearchSettings, search

__all__ = ["Budget", "CostModel", "DEVICES", "SearchResult", "SearchSettings", "TrialRecord", "search"]
