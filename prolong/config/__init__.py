"""Recipe sections as typed, validated, immutable configs (OLMo-core's composed experiment configs).

One module per concern: ``base`` (frozen configs, token counts, the stage-config base), ``model``,
``data`` (domains and sources), ``train`` (a training stage, Table 9), ``eval`` (an evaluation
stage), ``jobs`` (engine and job backend). The recipe that composes them — a graph of stages — is
prolong.recipe. A bad field fails with one line naming its dotted path
(``stage2.mixture: proportions sum to 0.97, not 1``).
"""

from prolong.config.base import StageConfig, Tokens, format_tokens, parse_tokens
from prolong.config.data import DataConfig, DomainConfig, FileSource, HFSource, MDSSource, RepoSource, Source
from prolong.config.eval import (EvalConfig, HelmetConfig, HelmetHFConfig, JsonKVConfig, JudgeConfig, LmEvalConfig,
                                 NeedleConfig, PasskeyConfig, PerplexityConfig, PositionLossConfig, ServeConfig)
from prolong.config.jobs import JobsConfig, ParallelConfig, SlurmConfig
from prolong.config.model import ModelConfig
from prolong.config.train import MixtureComponent, OptimConfig, TrainStageConfig

__all__ = ["StageConfig", "Tokens", "format_tokens", "parse_tokens", "DataConfig", "DomainConfig", "FileSource",
           "HFSource", "RepoSource", "Source", "EvalConfig", "HelmetConfig", "HelmetHFConfig", "JsonKVConfig",
           "JudgeConfig", "LmEvalConfig", "NeedleConfig", "PasskeyConfig", "PerplexityConfig", "PositionLossConfig", "ServeConfig", "JobsConfig",
           "MDSSource", "ParallelConfig", "SlurmConfig", "ModelConfig", "MixtureComponent", "OptimConfig", "TrainStageConfig"]
