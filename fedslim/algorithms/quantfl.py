"""QuantFL — communication-efficient federated learning with n-bit uploads: FedAvg (McMahan et al.,
AISTATS 2017) whose clients quantize their update to ``bits`` bits before upload, with stochastic
(DoReFa / QSGD-style, unbiased) or round-to-nearest rounding.

The method is FedAvg plus an uplink compressor, so it is written as one: this class installs the
``quantize`` codec stage (:mod:`fedslim.codecs.quantize`) as the run's uplink pipeline and leaves
everything else to FedAvg. The engine encodes each client's delta, counts ``len(payload)`` and hands
the server what it decodes from those bytes.

Where this departs from the reference code, and why:

* Only the tensors named by ``codec.targets`` are quantized (by default the weights of convolutions
  and linear layers; ``weights_and_biases`` adds their biases). The reference quantized everything,
  BatchNorm running statistics and the ``num_batches_tracked`` counters included, which distorts
  the statistics and can turn a counter into a fraction. Here those travel exact.
* The reference simulated quantization and still sent float32 tensors, so its 32/n saving existed
  on paper only. Here the codes are bit-packed (:mod:`fedslim.codecs.wire`) and the reported bytes
  are the payload's length, scales and headers included: 8 bits give a little under 4x, not 4x.
* What is quantized is the client's update (local minus received weights), as the method describes
  it; an update has a much smaller range than the weights, so the same bits lose less.
* ``bits: 32`` means no quantization (float32 on the wire), making the uncompressed baseline the
  same algorithm with one number changed.
* Stochastic rounding draws from the seeded per-(round, client) codec stream, so runs are
  reproducible on every backend.

``codec.up`` must be empty: QuantFL owns the uplink pipeline, and silently stacking or replacing a
configured one would make the run something other than what either setting says. Use
``algorithm.name: fedavg`` with ``codec.up`` for any other uplink pipeline.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedslim.algorithms.fedavg import FedAvg
from fedslim.codecs import Codec, build_pipeline
from fedslim.config import RunConfig
from fedslim.registry import ALGORITHMS


class QuantFLParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bits: int = Field(8, description="bits per uploaded value, 1..16; 32 = float32 (no quantization)")
    rounding: Literal["stochastic", "nearest"] = Field(
        "stochastic", description="stochastic: floor(x/s + u), unbiased (reference); nearest: round(x/s)")
    scheme: Literal["symmetric", "asymmetric"] = Field(
        "symmetric", description="symmetric: zero on the grid, 2^n - 1 levels (1 bit: the sign grid +-max|w|, no "
                                 "zero); asymmetric: all 2^n levels")
    granularity: Literal["tensor", "channel"] = Field("tensor", description="one scale per tensor or per "
                                                                             "output channel")

    @field_validator("bits", mode="before")
    @classmethod
    def _bits(cls, v: object) -> object:
        if isinstance(v, bool) or not isinstance(v, int) or not (1 <= v <= 16 or v == 32):
            # no "(got ...)" here: the config error adds the value
            raise ValueError("must be an integer from 1 to 16, or 32 for no quantization")
        return v


@ALGORITHMS.register("quantfl", "QuantFL: FedAvg with n-bit quantized uploads (stochastic or nearest)")
class QuantFL(FedAvg):
    name = "quantfl"
    Params = QuantFLParams
    params: QuantFLParams

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if cfg.codec.up:
            raise ValueError("codec.up: QuantFL installs its own uplink quantizer (algorithm.params.bits, "
                             "rounding, scheme, granularity); leave codec.up empty, or use algorithm "
                             "fedavg with codec.up for another uplink pipeline")

    def uplink_codec(self) -> Codec:
        """The uplink pipeline the engine uses instead of ``codec.up``."""
        p = self.params
        if p.bits == 32:
            return build_pipeline([], "algorithm.params")
        return build_pipeline([{"name": "quantize", "bits": p.bits, "rounding": p.rounding, "scheme": p.scheme,
                                "granularity": p.granularity}], "algorithm.params")
