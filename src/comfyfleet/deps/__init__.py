"""Dependencies: the catalog of models and custom nodes, each server type's dependency
profile, and the dependencies a workflow's loader nodes name.

``catalog`` holds the validated models and their YAML form; ``workflow`` derives a job's
dependencies from its API-format workflow. Both are pure: the store, the API, the agent's
loop and ``comfyfleet deps`` build on them.
"""

from comfyfleet.deps.catalog import (
    KINDS,
    TOKEN_NAMES,
    CatalogEntry,
    CatalogMerge,
    DependencyCatalog,
    DependencyKind,
    DependencyProfile,
    DynamicPolicy,
    StaticDependencies,
    load_catalog,
    parse_catalog,
)
from comfyfleet.deps.workflow import (
    AmbiguousReference,
    LoaderReference,
    WorkflowDependencies,
    dependencies_of,
    loader_references,
)

__all__ = [
    "KINDS",
    "TOKEN_NAMES",
    "AmbiguousReference",
    "CatalogEntry",
    "CatalogMerge",
    "DependencyCatalog",
    "DependencyKind",
    "DependencyProfile",
    "DynamicPolicy",
    "LoaderReference",
    "StaticDependencies",
    "WorkflowDependencies",
    "dependencies_of",
    "load_catalog",
    "loader_references",
    "parse_catalog",
]
