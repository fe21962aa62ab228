"""What fsck finds: each finding, the result of a check, its exit code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

EXIT_CLEAN, EXIT_FIXED, EXIT_UNFIXED, EXIT_OPERATIONAL = 0, 1, 4, 8


@dataclass
class Finding:
    kind: str
    detail: str
    slot: int | None = None
    key: str | None = None
    fixed: bool = False


@dataclass
class CheckResult:
    path: str
    findings: list[Finding] = field(default_factory=list)
    entries: int = 0
    slots_total: int = 0
    bytes_scrubbed: int = 0
    seconds: float = 0.0
    repaired: bool = False

    @property
    def exit_code(self) -> int:
        if not self.findings:
            return EXIT_CLEAN
        return EXIT_FIXED if all(f.fixed for f in self.findings) else EXIT_UNFIXED

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exit_code"] = self.exit_code
        d["scrub_gbps"] = self.bytes_scrubbed / self.seconds / 1e9 if self.seconds else 0.0
        return d


def add(res: CheckResult, kind: str, detail: str, fixed: bool, slot=None, key=None) -> None:
    res.findings.append(Finding(kind, detail, slot, None if key is None else repr(key), fixed))
