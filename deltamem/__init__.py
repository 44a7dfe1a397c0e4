"""δ-mem: an online associative memory for frozen LLMs (arXiv 2605.12357)."""

from .scan import (
    delta_rule_scan,
    delta_rule_scan_chunked,
    delta_rule_scan_reference,
    delta_rule_scan_varlen_cpu,
)

__all__ = [
    "delta_rule_scan",
    "delta_rule_scan_chunked",
    "delta_rule_scan_reference",
    "delta_rule_scan_varlen_cpu",
]
