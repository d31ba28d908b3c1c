"""The choice between per-location queries and one listing (sam2_refine/job/read_plan.py)."""

from __future__ import annotations

import pytest

from sam2_refine.job.read_plan import ReadCosts, plan_annotation_reads, read_connections_per_annotation

COSTS = ReadCosts()


def test_one_location_of_a_large_dataset_is_one_query():
    plan = plan_annotation_reads(((0,), (0,), (3,)), (1, 1, 100), 1_000_000)
    assert plan.locations == ({"Time": 3},)  # XY and Z are whole: left out of the filter


def test_every_time_point_at_one_position_is_one_query_on_xy():
    plan = plan_annotation_reads(((2,), (0,), tuple(range(1000))), (4, 1, 1000), 1_000_000)
    assert plan.locations == ({"XY": 2},)


def test_the_whole_dataset_is_one_listing():
    plan = plan_annotation_reads(((0, 1), (0,), (0, 1, 2)), (2, 1, 3), 500_000)
    assert plan.locations is None and not plan.scoped


def test_a_small_dataset_is_one_listing_even_for_one_location():
    """Below a few dozen annotations a query and a hydrate cost more requests than one page."""
    assert plan_annotation_reads(((0,), (0,), (1,)), (1, 1, 10), 10).locations is None


def test_a_location_a_fifth_of_the_way_through_is_queried_when_the_dataset_is_large():
    assert plan_annotation_reads(((0,), (0,), (1,)), (1, 1, 5), 100_000).scoped


def test_scattered_locations_many_queries_against_one_listing():
    """Q queries cost Q walks of the dataset; past some Q one listing is cheaper: with the
    measured costs a walk of an annotation costs 1/50 of shipping it, so fixing an axis pays while
    its queries number less than about 50 times the share of the dataset they spare."""
    xy = tuple(range(0, 100, 2))                      # 50 of 100 positions
    few = tuple(range(0, 1000, 100))                  # 10 of 1000 time points
    plan = plan_annotation_reads((xy, (0,), few), (100, 1, 1000), 1_000_000)
    # fixing Time: 10 walks shipping 1 %; XY too: 500 walks; XY alone: 50 walks shipping half
    assert plan.locations is not None
    assert len(plan.locations) == 10 and all(set(f) == {"Time"} for f in plan.locations)
    many = tuple(range(0, 1000, 10))                  # 100 of 1000 time points
    assert plan_annotation_reads((xy, (0,), many), (100, 1, 1000), 1_000_000).locations is None


@pytest.mark.parametrize("n", [0, 10, 10_000, 1_000_000])
def test_the_chosen_plan_is_never_dearer_than_the_listing(n):
    plan = plan_annotation_reads(((0,), (0,), (1, 2)), (3, 1, 10), n)
    listing = plan_annotation_reads(((0, 1, 2), (0,), tuple(range(10))), (3, 1, 10), n)
    assert listing.locations is None
    assert plan.seconds <= listing.seconds + 1e-12


def test_connections_per_annotation_or_one_listing():
    """A query for one annotation's connections walks all of the dataset's connections on the
    server (NimbusImage's find is hinted to {datasetId, _id}): it pays only for a few annotations."""
    assert read_connections_per_annotation(2, 100_000)          # 2 walks against shipping 100,000
    assert not read_connections_per_annotation(100, 1_000_000)  # 100 walks of a million: list once
    assert not read_connections_per_annotation(100, 0)          # nothing to list: one request
    assert not read_connections_per_annotation(50_000, 100_000)  # a refine-all: list them once
