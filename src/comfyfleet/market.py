"""The I/O shell around the pure ranking in ``offers``: search, rank, rent.

``offers`` decides (pure functions); this module asks the provider for offers
that may fit a profile and rents the best one under a unique label, so that a
contract can always be found again, and so that a create whose answer was lost
is adopted by the client rather than rented twice.
"""

from __future__ import annotations

import uuid

from comfyfleet.errors import ComfyfleetError, OfferUnavailable
from comfyfleet.offers import RankedOffer, Ranking, rank, search_query
from comfyfleet.profiles import Profile
from comfyfleet.providers.base import CreateRequest, Instance, Provider

SEARCH_LIMIT = 1000
RENT_CANDIDATES = 3


async def rank_for(
    provider: Provider,
    profile: Profile,
    *,
    explain: bool = False,
    blocked_machines: frozenset[int] = frozenset(),
) -> Ranking:
    """Search the marketplace for the profile and rank what comes back.

    With ``explain`` the search sends only the base filters, so the offers the
    profile rejects come back too, each with its reasons.
    """
    query = search_query(profile, broad=explain)
    offers = await provider.search_offers(
        query, allocated_storage_gb=profile.disk_gb, limit=SEARCH_LIMIT
    )
    return rank(offers, profile, blocked_machines=blocked_machines)


def new_label(profile_name: str) -> str:
    """A unique label: every contract comfyfleet rents carries one, so it can be found again."""
    return f"comfyfleet-{profile_name}-{uuid.uuid4().hex[:10]}"


def create_request_for(profile: Profile, label: str) -> CreateRequest:
    return CreateRequest(
        image=profile.image,
        disk_gb=profile.disk_gb,
        label=label,
        env=dict(profile.env),
        onstart=profile.onstart,
        runtype=profile.runtype,
    )


async def rent_best(
    provider: Provider, profile: Profile, profile_name: str
) -> tuple[RankedOffer, Instance]:
    """Rent the top offer; when it was taken meanwhile, try the next ones."""
    ranking = await rank_for(provider, profile)
    if not ranking.accepted:
        raise ComfyfleetError(
            f"no offer passes profile '{profile_name}': run `comfyfleet offers "
            f"--profile {profile_name} --explain` to see why"
        )
    gone: list[str] = []
    for candidate in ranking.accepted[:RENT_CANDIDATES]:
        try:
            instance_id = await provider.create_instance(
                candidate.offer.id, create_request_for(profile, new_label(profile_name))
            )
        except OfferUnavailable as error:
            gone.append(f"{candidate.offer.id}: {error}")
            continue
        return candidate, await provider.get_instance(instance_id)
    raise OfferUnavailable(
        f"the {len(gone)} best offers were rented by someone else: " + "; ".join(gone),
        status=404,
        code="no_such_ask",
    )
