"""Domain-independent outputs: reports and plots."""

from insitu.exports.report import markdown_table, plot_loss_curve, read_metric, write_report

__all__ = ["markdown_table", "plot_loss_curve", "read_metric", "write_report"]
