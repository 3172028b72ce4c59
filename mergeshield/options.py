"""Bounds of every scan option, shared by the library's models, the CLI and the API.

Each option's type says what a real scan may ask for, generously: finite floats only (a NaN λ
would write a NaN checkpoint), and ceilings on whatever sets a scan's length (epochs, images,
steps), so no request can pin a worker for hours. The API documents them in its OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

MAX_SEED = 2**32 - 1  # what torch and numpy generators take

Lambda = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]  # IBVS step size λ
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Pixel = Annotated[int, Field(ge=0, le=4096)]  # a trigger's row, column or margin
ClassIndex = Annotated[int, Field(ge=0, le=100_000)]  # a target label
Points = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]  # accuracy points
EvalImages = Annotated[int, Field(ge=1, le=1_000_000)]  # test images evaluated
TrainImages = Annotated[int, Field(ge=1, le=1_000_000)]  # defender images for the injection
InversionSteps = Annotated[int, Field(ge=1, le=10_000)]
Epochs = Annotated[int, Field(ge=1, le=100)]
BatchSize = Annotated[int, Field(ge=1, le=4096)]
LearningRate = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Share = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]  # a share that must be > 0
WarpShift = Annotated[float, Field(gt=0, le=8, allow_inf_nan=False)]  # pixels per 28 of a side
ImageSide = Annotated[int, Field(ge=8, le=1024)]  # evaluation images resized to this side
MAX_LIST = 64  # λ grid points; triggers and targets: at most MAX_TRIGGERS
MAX_TRIGGERS = 32
