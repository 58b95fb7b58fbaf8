"""Reports from run directories: the four-criteria table, seed aggregates, plots, examples, manifests."""

from emguard.report.build import ReportResult, write_report

__all__ = ["ReportResult", "write_report"]
