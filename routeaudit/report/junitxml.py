"""JUnit XML reporter (``--junitxml PATH``): one testcase per verdict, so CI shows claims as tests.

fail → <failure>, error → <error>, skip → <skipped>, inconclusive → <failure> unless
``--inconclusive=warn`` (then <skipped>), matching the exit-code rule.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from routeaudit.hookspecs import hookimpl
from routeaudit.report.files import check_target, write_atomic
from routeaudit.verdict import Report, Status


def to_xml(report: Report, *, inconclusive_fails: bool = True) -> ET.Element:
    counts = report.summary.model_dump(by_alias=True)
    failures = counts["fail"] + (counts["inconclusive"] if inconclusive_fails else 0)
    skipped = counts["skip"] + (0 if inconclusive_fails else counts["inconclusive"])
    suite = ET.Element("testsuite", name="routeaudit", tests=str(len(report.verdicts)),
                       failures=str(failures), errors=str(counts["error"]),
                       skipped=str(skipped), time=f"{report.duration_s:.3f}")
    for v in report.verdicts:
        case = ET.SubElement(suite, "testcase", classname=f"{v.target}::{v.audit}",
                             name=f"{v.audit}[{v.cell_id}]" if v.cell else v.audit)
        ET.SubElement(case, "properties")
        for key in ("effect", "p_value", "p_value_corrected"):
            value = getattr(v, key)
            if value is not None:
                ET.SubElement(case.find("properties"), "property", name=key, value=repr(value))
        if v.status is Status.FAIL or (v.status is Status.INCONCLUSIVE and inconclusive_fails):
            node = ET.SubElement(case, "failure", message=v.reason, type=v.status.value)
            node.text = v.reason
        elif v.status is Status.ERROR:
            node = ET.SubElement(case, "error", message=v.reason)
            node.text = v.traceback or v.reason
        elif v.status in (Status.SKIP, Status.INCONCLUSIVE):
            ET.SubElement(case, "skipped", message=v.reason)
        ET.SubElement(case, "system-out").text = v.claim
    root = ET.Element("testsuites")
    root.append(suite)
    return root


@hookimpl
def routeaudit_addoption(parser: Any) -> None:
    parser.getgroup("reporting").add_argument(
        "--junitxml", metavar="PATH", help="write JUnit XML to PATH, one testcase per verdict")


@hookimpl
def routeaudit_configure(config: Any) -> None:
    path = getattr(config.options, "junitxml", None)
    if path:
        check_target(path, "junitxml", "--junitxml")  # before the run, not after it


@hookimpl
def routeaudit_report(config: Any, report: Report) -> None:
    path = getattr(config.options, "junitxml", None)
    if path:
        root = to_xml(report, inconclusive_fails=config.options.inconclusive == "fail")
        ET.indent(root)
        write_atomic(path, ET.tostring(root, encoding="utf-8", xml_declaration=True))
