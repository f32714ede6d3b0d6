"""Domain-independent outputs: reports (Markdown and self-contained HTML), plots and overlays."""

from insitu.exports.report import markdown_table, plot_loss_curve, write_report

__all__ = ["markdown_table", "plot_loss_curve", "write_report"]
