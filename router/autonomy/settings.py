"""``[autonomy]``: how the controller serves its stations while the CSMS is unreachable (errata 4.13 to §6.3).

Every field carries its unit in its name or description, a default and bounds, like the models in
:mod:`router.config` (which will hold this one as ``Settings.autonomy``). The model is defined here rather
than there so that the autonomy package owns its knobs and ``router.config`` only imports it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The same strictness as router.config's models: unknown keys are errors, values are not coerced.
_MODEL = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

#: The policies for an idToken the authorization cache does not know (mirrors a station's own
#: OfflineTxForUnknownIdEnabled, C15): refuse it, or let the driver charge and let the CSMS judge on restore.
UnknownIdTokenPolicy = Literal["reject", "accept"]


class AutonomySettings(BaseModel):
    """Site autonomy: answer the stations locally while the CSMS is gone, replay to it once it is back."""

    model_config = _MODEL
    enabled: bool = Field(
        default=True,
        description="keep stations connected and answer them locally while the CSMS is unreachable "
        "(true/false; false: close them, the strict OCPP §6.3 rule)",
    )
    max_offline_s: float = Field(
        default=86_400.0,
        ge=60,
        le=604_800,
        description="serve a station locally for at most this long after its CSMS connection was lost; "
        "then it is closed as under the strict rule (seconds, 60 to 604800)",
    )
    queue_max_messages_per_station: int = Field(
        default=20_000,
        ge=100,
        le=1_000_000,
        description="messages kept on disk for one station's CSMS (queued plus latest state); a station "
        "above it is answered with an error and keeps its message itself (count, 100 to 1000000)",
    )
    queue_max_bytes: int = Field(
        default=268_435_456,
        ge=1_048_576,
        le=68_719_476_736,
        description="disk space for every station's kept messages together (bytes, 1 MiB to 64 GiB)",
    )
    unknown_id_tokens: UnknownIdTokenPolicy = Field(
        default="reject",
        description="an idToken the authorization cache does not know, while the CSMS is unreachable: "
        "'reject' (answered Unknown) or 'accept' (answered Accepted; the CSMS judges it on restore)",
    )
    stop_invalid_transactions: bool = Field(
        default=False,
        description="when the CSMS refuses, on restore, an idToken that was accepted locally, stop that "
        "transaction with RequestStopTransaction, as a station with StopTxOnInvalidId would (true/false)",
    )
    reconnect_rate_per_s: float = Field(
        default=10.0,
        ge=0.1,
        le=1000,
        description="CSMS connections re-opened for local stations once the CSMS is back, at most this many "
        "a second, with jitter (connections per second, 0.1 to 1000)",
    )
    reconnect_backoff_max_s: float = Field(
        default=30.0,
        ge=1,
        le=600,
        description="while the CSMS stays unreachable, each local station tries again after a wait that "
        "doubles from 1 s up to this, with jitter (seconds, 1 to 600)",
    )
    auth_cache_max_entries: int = Field(
        default=10_000,
        ge=0,
        le=1_000_000,
        description="idTokens remembered from the CSMS's answers; the least recently used go first "
        "(count, 0 to 1000000; 0: no cache, every idToken is unknown)",
    )
    auth_cache_lifetime_s: int = Field(
        default=2_592_000,
        ge=60,
        le=31_536_000,
        description="an idToken the CSMS gave no cacheExpiryDateTime is forgotten this long after it was "
        "last seen, as AuthCacheLifeTime on a station (C10.FR.08) (whole seconds, 60 to 31536000)",
    )
