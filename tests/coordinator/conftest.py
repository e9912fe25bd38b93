"""Fixtures shared by the coordinator's unit tests: one tiny-model catalog for the session."""

from __future__ import annotations

import pytest

from coordinator.catalog import Catalog, CatalogEntry
from tests.coordinator.core_fakes import MODEL, MinerKey, build_catalog


@pytest.fixture(scope="session")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    return build_catalog(tmp_path_factory.mktemp("catalog"))


@pytest.fixture(scope="module")
def entry(catalog: Catalog) -> CatalogEntry:
    return catalog.get(MODEL)


@pytest.fixture
def key() -> MinerKey:
    return MinerKey()
