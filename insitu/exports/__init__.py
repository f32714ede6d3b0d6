"""Domain-independent outputs: reports (Markdown and self-contained HTML), plots and overlays."""

from insitu.exports.html import write_html_report
from insitu.exports.report import markdown_table, plot_loss_curve, read_metric, write_report

__all__ = ["markdown_table", "plot_loss_curve", "read_metric", "write_html_report", "write_report"]
