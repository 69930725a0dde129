"""``attnlab compare``: benchmark and train every chosen mechanism, then write the report.

:mod:`~attnlab.compare.plan` fixes what runs; :mod:`~attnlab.compare.run` runs it
(resumable, in parallel where the cores allow) into one run directory, and
:func:`attnlab.report.build.build_report` turns the stored results into the report.
"""

from attnlab.compare.plan import DEFAULT_TASK, PROFILES, Plan, make_plan
from attnlab.compare.run import run_compare

__all__ = ["DEFAULT_TASK", "PROFILES", "Plan", "make_plan", "run_compare"]
