"""Realistic sample scan reports for tests of the report renderers, the CLI and the service.

The numbers are shaped like a real scan of a BadNets-backdoored ViT on CIFAR-10 (1,000 non-target
images per trigger, 10,000 clean images), and some strings are hostile on purpose: a report's repo
ids, trigger ids and specs come from the attacker.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import zlib

from mergeshield.layers import per_layer
from mergeshield.report.schema import (
    DatasetInput,
    FileDigest,
    IncompleteReason,
    InjectionSummary,
    LambdaPoint,
    Metrics,
    ModelInput,
    OutputSummary,
    RateModel,
    ScanReport,
    SkippedTensor,
    SweepSummary,
    TaskVectorSummary,
    TensorStat,
    TriggerMeasurement,
)
from mergeshield.report.verdict import decide

HOSTILE = "<script>alert(1)</script>"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
N_TRIGGER = 1000  # non-target test images per trigger
N_CLEAN = 10000  # clean test images


def wilson(hits: int, total: int, z: float = 1.959964) -> RateModel:
    """``hits/total`` with its 95% Wilson score interval."""
    if total == 0:
        return RateModel(hits=0, total=0, rate=0.0, ci95=(0.0, 1.0))
    p = hits / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return RateModel(
        hits=hits, total=total, rate=p, ci95=(max(0.0, centre - half), min(1.0, centre + half))
    )


def tiny_png(size: int = 8) -> str:
    """A base64 PNG: a black-and-white checkerboard, ``size`` x ``size`` greyscale pixels."""
    rows = b"".join(b"\x00" + bytes(255 * ((x + y) % 2) for x in range(size)) for y in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return base64.b64encode(png).decode("ascii")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# trigger id, source, spec, (reference, before, after) hits out of N_TRIGGER
_TRIGGERS: list[tuple[str, str, dict[str, object], tuple[int, int, int]]] = [
    (
        "injection:patch-white-4-bottom_right",
        "injection",
        {"kind": "patch", "pattern": "white", "size": 4, "position": "bottom_right"},
        (12, 948, 31),
    ),
    (
        "probe:patch-checkerboard-3-bottom_right",
        "probe",
        {"kind": "patch", "pattern": "checkerboard", "size": 3, "position": "bottom_right"},
        (12, 961, 24),
    ),
    (
        "probe:blend-noise-0.1",
        "probe",
        {"kind": "blend", "pattern": "noise", "alpha": 0.1, "seed": 0},
        (35, 41, 38),
    ),
    (
        "inverted:class-0",
        "inverted",
        {"kind": "patch", "pattern": "optimised", "size": 3, "target": 0, "steps": 200},
        (80, 720, 95),
    ),
    (
        f"user:{HOSTILE}",
        "user",
        {"kind": "patch", "pattern": HOSTILE, "size": 2, "position": "top_left"},
        (9, 14, 10),
    ),
]
_CLEAN_BEFORE_HITS = 9612
_LAMBDAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _triggers(backdoored: bool, cleaned: bool) -> list[TriggerMeasurement]:
    out = []
    for tid, source, spec, (ref, before, after) in _TRIGGERS:
        if not backdoored:
            before = ref + 3  # the suspect behaves like the base
            after = ref + 2
        out.append(
            TriggerMeasurement(
                id=tid,
                source=source,  # type: ignore[arg-type]
                spec=spec,
                target=0,
                target_class=CLASSES[0],
                asr_reference=wilson(ref, N_TRIGGER),
                asr_before=wilson(before, N_TRIGGER),
                asr_after=wilson(after, N_TRIGGER) if cleaned else None,
                preview_png=tiny_png(),
            )
        )
    return out


def _sweep(triggers: list[TriggerMeasurement]) -> SweepSummary:
    points = []
    for i, lam in enumerate(_LAMBDAS):
        frac = i / (len(_LAMBDAS) - 1)  # 0 at lambda = 0, 1 at the largest lambda
        asr = {}
        for t in triggers:
            end = t.asr_after.hits if t.asr_after else t.asr_before.hits
            hits = round(t.asr_before.hits + (end - t.asr_before.hits) * frac)
            asr[t.id] = wilson(hits, N_TRIGGER)
        points.append(
            LambdaPoint(
                lam=lam,
                clean_accuracy=wilson(_CLEAN_BEFORE_HITS - round(180 * frac**2), N_CLEAN),
                asr=asr,
            )
        )
    return SweepSummary(
        policy="largest lambda with clean-accuracy drop <= 2.0 points",
        budget_points=2.0,
        chosen_lambda=0.75,
        points=points,
    )


def _task_vector() -> TaskVectorSummary:
    stats = []
    for i in range(20):
        layer, part = divmod(i, 4)
        name = (
            f"vit.encoder.layer.{layer}."
            + [
                "attention.attention.query.weight",
                "attention.output.dense.weight",
                "intermediate.dense.weight",
                "output.dense.weight",
            ][part]
        )
        numel = 768 * 768 if part < 2 else 768 * 3072
        rel = 0.002 + 0.0007 * ((i * 7) % 20)  # deterministic, unsorted
        stats.append(
            TensorStat(
                name=name,
                numel=numel,
                norm=rel * 28.0,
                relative_norm=rel,
                cosine_with_injection_bv=round(0.05 + 0.02 * (i % 5), 3),
            )
        )
    return TaskVectorSummary(
        n_tensors=len(stats),
        n_parameters=sum(s.numel for s in stats),
        norm=1.93,
        base_norm=412.5,
        per_tensor=stats,
        per_layer=per_layer((s.name, s.numel, s.norm, 28.0) for s in stats),
        skipped=[
            SkippedTensor(name="classifier.weight", reason="head (not part of the task vector)"),
            SkippedTensor(name="vit.embeddings.position_ids", reason="non-float dtype int64"),
        ],
    )


def _model(source: str, revision: str, family: str) -> ModelInput:
    return ModelInput(
        source=source,
        kind="hub",
        revision_requested="main",
        revision=revision,
        family=family,
        architecture="ViTForImageClassification",
        files=[
            FileDigest(path="config.json", size=742, sha256=_sha(source + "config")),
            FileDigest(path="model.safetensors", size=343_223_968, sha256=_sha(source + "w")),
        ],
    )


def sample_report(backdoored: bool = True, incomplete: bool = False) -> ScanReport:
    """A full scan report; ``incomplete`` stops before sanitising (no sweep, no ``asr_after``)."""
    triggers = _triggers(backdoored, cleaned=not incomplete)
    reasons = (
        [
            IncompleteReason(
                code="sweep",
                message="the lambda sweep ran out of GPU memory; the checkpoint was not cleaned",
            )
        ]
        if incomplete
        else []
    )
    findings, verdict = decide(triggers, incomplete=reasons)
    clean_before = wilson(_CLEAN_BEFORE_HITS, N_CLEAN)
    return ScanReport(
        scanner_version="0.1.0",
        scan_id="scn_01HZX3K9Q8T5",
        created_at="2025-06-01T12:00:00Z",
        suspect=_model(f"evil-org/{HOSTILE}", "a" * 40, "vit"),
        base=_model("google/vit-base-patch16-224-in21k", "b" * 40, "vit"),
        evaluation=DatasetInput(
            source="uoft-cs/cifar10",
            name="cifar10",
            classes=CLASSES,
            split="test",
            size=N_CLEAN,
            sha256=_sha("cifar10-test"),
        ),
        config={"min_asr_gap": 0.2, "lambdas": _LAMBDAS, "budget_points": 2.0, "seed": 0},
        config_hash=_sha("config"),
        device="cuda:0 (NVIDIA H100 80GB HBM3)",
        timings={"download": 12.4, "task_vector": 3.1, "injection": 41.7, "evaluation": 88.2},
        task_vector=_task_vector(),
        injection=InjectionSummary(
            recipe={"attack": "badnets", "trigger": "patch-white-4-bottom_right", "epochs": 2},
            recipe_hash=_sha("recipe"),
            cached=False,
            bv_norm=1.12,
            cosine_with_task_vector=0.41 if backdoored else 0.03,
        ),
        metrics=Metrics(
            clean_accuracy_reference=wilson(1021, N_CLEAN),
            clean_accuracy_before=clean_before,
            clean_accuracy_after=None if incomplete else wilson(_CLEAN_BEFORE_HITS - 101, N_CLEAN),
            triggers=triggers,
        ),
        sweep=None if incomplete else _sweep(triggers),
        findings=findings,
        verdict=verdict,
        incomplete=reasons,
        output=None
        if incomplete
        else OutputSummary(
            directory="out/scn_01HZX3K9Q8T5",
            files=[
                FileDigest(path="cleaned/model.safetensors", size=343_223_968, sha256=_sha("o"))
            ],
            metadata={"mergeshield.scan_id": "scn_01HZX3K9Q8T5", "mergeshield.ibvs_lambda": "0.75"},
        ),
    )
