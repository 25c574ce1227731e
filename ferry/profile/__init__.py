"""Profiling one generation: `profiler.py` measures (timed views of the weights, the link's copy
trace), `summary.py` sums it up (phases, layers, link, memory, the cost model's prediction),
`report.py` presents it (the human report, the Chrome/Perfetto trace)."""

from ferry.profile.profiler import Run, profile_generation
from ferry.profile.summary import predict_run, summarize
from ferry.profile.report import chrome_trace, format_report, write_trace

__all__ = ["Run", "chrome_trace", "format_report", "predict_run", "profile_generation", "summarize",
           "write_trace"]
