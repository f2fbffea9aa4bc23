"""Does a compressed cache answer as well as the text, and sooner? (`kvc eval`, docs/EVAL.md)

from kvc.evaluation import evaluate_file, evaluate_needle, evaluate_qa, load_examples
"""

from kvc.evaluation.needle import evaluate_needle
from kvc.evaluation.qa import evaluate_qa, load_examples
from kvc.evaluation.replay import evaluate_context, evaluate_file, evaluate_tokens, zero_values

__all__ = [
    "evaluate_context",
    "evaluate_file",
    "evaluate_needle",
    "evaluate_qa",
    "evaluate_tokens",
    "load_examples",
    "zero_values",
]
