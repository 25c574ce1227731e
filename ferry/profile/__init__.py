"""Profiling one generation: `profiler.py` measures (timed views of the weights, the link's copy
trace), `report.py` presents (the human report, the Chrome/Perfetto trace)."""

from ferry.profile.profiler import Run, predict_run, profile_generation, summarize
from ferry.profile.report import chrome_trace, format_report, write_trace

__all__ = ["Run", "chrome_trace", "format_report", "predict_run", "profile_generation", "summarize",
           "write_trace"]
