"""Probes: blocks that observe a model inside a surgery trace and report a result."""

from probes.record import RecordedStates, RecordSite, RecordSiteConfig

__all__ = ["RecordSite", "RecordSiteConfig", "RecordedStates"]
