"""thinklens.report: a full study of one model as one self-contained HTML page.

Example::

    from thinklens.report import report
    path = report("organism", "thinklens-report")   # report.html + figures/*.pdf, *.svg

``thinklens report`` runs the same from the command line. :class:`Report` and
:class:`Section` build pages of your own.
"""

from thinklens.report.page import Figure, Report, Section, Table
from thinklens.report.studies import report, study

__all__ = ["report", "study", "Report", "Section", "Table", "Figure"]
