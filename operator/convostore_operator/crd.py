"""The ConversationStore CRD, defined once, here; the YAML in the chart and in
`manifests/` is generated from it (`convostore operator crd`) and a test keeps them equal.

The schema does what an API server can do before the operator sees anything: types,
enums, patterns and bounds per field, and CEL rules for what depends on several fields
("a postgres backend needs postgres.dsnSecretRef"). The operator validates again
(`spec.py`), since not every cluster enforces every rule and the message can be better.
"""

from __future__ import annotations

from typing import Any

from convostore_sidecar.drivers import BACKENDS as DECLARED
from convostore_sidecar.drivers import Capability
from convostore_sidecar.labels import NAME as LABEL_NAME

GROUP, VERSION, KIND, PLURAL, SHORT = (
    "convostore.dev",
    "v1alpha1",
    "ConversationStore",
    "conversationstores",
    "cstore",
)
BACKENDS = list(DECLARED)
DURATION = r"^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$"
NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
SECRET_KEY = r"^[-._a-zA-Z0-9]{1,253}$"
# a store's name goes into pod volume names (`convostore-store-<name>`, 63 at most)
STORE_NAME, MAX_STORE_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", 46
# injected pods can write only below DATA_DIR (an emptyDir); the root is read-only
DATA_DIR = "/var/lib/convostore"


def _secret_ref(what: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": f"The Secret (in the store's namespace) and key that hold {what}.",
        "required": ["name", "key"],
        "properties": {
            "name": {"type": "string", "pattern": NAME, "maxLength": 253},
            "key": {"type": "string", "pattern": SECRET_KEY},
        },
    }


def _int(low: int, high: int, description: str) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high, "description": description}


def _duration(description: str) -> dict[str, Any]:
    return {"type": "string", "pattern": DURATION, "maxLength": 32, "description": description}


SQLITE: dict[str, Any] = {
    "type": "object",
    "description": "Embedded SQLite inside each pod (history is per pod).",
    "properties": {
        "path": {
            "type": "string",
            "default": f"{DATA_DIR}/convostore.db",
            "pattern": rf"^{DATA_DIR}/[A-Za-z0-9_][-A-Za-z0-9_.]*$",
            "maxLength": 255,
            "description": f"A file directly in {DATA_DIR}, the one writable directory "
            "of an injected sidecar.",
        }
    },
}


def _host_ports(what: str) -> dict[str, Any]:
    return {
        "type": "array",
        "minItems": 1,
        "maxItems": 16,
        "items": {
            "type": "string",
            "maxLength": 262,
            "pattern": r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}$",
        },
        "description": f"{what}, as host:port.",
    }


REDIS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "url": {
            "type": "string",
            "pattern": r"^(redis|rediss)://[^\s]+$",
            "maxLength": 2048,
            "description": "Without a password; see passwordSecretRef.",
        },
        "urlSecretRef": _secret_ref("the Redis URL"),
        "username": {"type": "string", "maxLength": 256},
        "passwordSecretRef": _secret_ref("the Redis password"),
        "caSecretRef": _secret_ref("the PEM CA that signed the server's certificate (rediss://)"),
        "keyPrefix": {"type": "string", "pattern": r"^[^{}\s]{1,200}$"},
        "maxConnections": _int(
            1, 10_000, "Connections per sidecar (per node on a cluster); 64 unset."
        ),
        "idleTimeout": _duration(
            "Free connections are closed once the store has been idle this long "
            "(30s unset; 0.1s to 24h)."
        ),
        "waitReplicas": {
            "type": "integer",
            "minimum": 0,
            "maximum": 100,
            "description": "Answer appends and clears only once this many replicas hold "
            "them (WAIT, within 1 s; fewer answers 503 and the client retries).",
        },
        "sentinel": {
            "type": "object",
            "description": "Find the primary through Redis Sentinel, instead of url: "
            "the sidecar follows a failover to the replica the Sentinels promote.",
            "required": ["hosts", "serviceName"],
            "properties": {
                "hosts": _host_ports("The Sentinels"),
                "serviceName": {
                    "type": "string",
                    "pattern": r"^[A-Za-z0-9._-]{1,128}$",
                    "description": "The name the Sentinels monitor the primary by.",
                },
                "database": _int(0, 10_000, "The database number on the primary."),
                "username": {
                    "type": "string",
                    "maxLength": 256,
                    "description": "For the Sentinels; redis.username is the data nodes'.",
                },
                "passwordSecretRef": _secret_ref("the Sentinels' password"),
            },
        },
        "cluster": {
            "type": "object",
            "description": "A Redis Cluster, instead of url: the sidecar learns the other "
            "nodes from these and follows slot moves and failovers.",
            "required": ["nodes"],
            "properties": {
                "nodes": _host_ports("Seed nodes (one is enough; more, in case it is down)"),
                "tls": {
                    "type": "boolean",
                    "description": "TLS to every node (caSecretRef: the CA that signed them).",
                },
            },
        },
    },
    "x-kubernetes-validations": [
        {
            "rule": "!has(self.sentinel) || "
            "!(has(self.url) || has(self.urlSecretRef) || has(self.caSecretRef))",
            "message": "redis.sentinel names the primary itself: give it without url, "
            "urlSecretRef or caSecretRef",
            "fieldPath": ".sentinel",
        },
        {
            "rule": "!has(self.cluster) || "
            "!(has(self.url) || has(self.urlSecretRef) || has(self.sentinel))",
            "message": "redis.cluster names the nodes itself: give it without url, "
            "urlSecretRef or sentinel",
            "fieldPath": ".cluster",
        },
        {
            "rule": "!has(self.cluster) || !has(self.caSecretRef) || "
            "(has(self.cluster.tls) && self.cluster.tls)",
            "message": "a CA is for TLS: set redis.cluster.tls: true",
            "fieldPath": ".caSecretRef",
        },
    ],
}

POSTGRES: dict[str, Any] = {
    "type": "object",
    "properties": {
        "dsnSecretRef": _secret_ref(
            "a postgresql:// DSN (several hosts, for failover, need "
            "target_session_attrs=read-write)"
        ),
        "passwordSecretRef": _secret_ref("the password, if not in the DSN"),
        "caSecretRef": _secret_ref(
            "the PEM CA that signed the server's certificate (verified: verify-full)"
        ),
        "schema": {"type": "string", "pattern": r"^[a-z_][a-z0-9_]{0,62}$"},
        "poolMin": _int(0, 100, "Connections each sidecar keeps open while idle (0 unset)."),
        "poolMax": _int(1, 1000, "Connections per sidecar (4 unset)."),
        "idleTimeout": _duration(
            "A connection unused this long is closed, down to poolMin (30s unset; 0.1s to 24h)."
        ),
        "synchronousCommit": {
            "type": "string",
            "enum": ["remote_apply", "on", "remote_write", "local", "off"],
            "description": "The sessions' synchronous_commit; unset, the server's. With a "
            "synchronous standby, on waits for it and local does not.",
        },
        "transactionPooler": {
            "type": "boolean",
            "description": "The DSN reaches PostgreSQL through a pooler in transaction mode "
            "(PgBouncer, CloudNativePG's Pooler): no session state, no prepared statements; "
            "migrations then go over directDsnSecretRef.",
        },
        "directDsnSecretRef": _secret_ref(
            "a postgresql:// DSN straight to PostgreSQL (past the pooler), for migrations"
        ),
    },
    "x-kubernetes-validations": [
        {
            "rule": "!has(self.poolMin) || self.poolMin <= (has(self.poolMax) ? self.poolMax : 4)",
            "message": "poolMin must not exceed poolMax (4 unset)",
            "fieldPath": ".poolMin",
        },
        {
            "rule": "!has(self.transactionPooler) || !self.transactionPooler || "
            "has(self.directDsnSecretRef)",
            "message": "transactionPooler needs directDsnSecretRef: migrations need a "
            "connection straight to PostgreSQL",
            "fieldPath": ".directDsnSecretRef",
        },
    ],
}


SQLALCHEMY: dict[str, Any] = {
    "type": "object",
    "description": "MySQL, MariaDB or PostgreSQL (or another database with a SQLAlchemy "
    "asyncio dialect) through SQLAlchemy; the tables are made by the operator.",
    "properties": {
        "urlSecretRef": _secret_ref(
            "a SQLAlchemy URL, dialect+driver://user@host:port/database "
            "(mysql+asyncmy, postgresql+asyncpg)"
        ),
        "passwordSecretRef": _secret_ref("the password, if not in the URL"),
        "caSecretRef": _secret_ref(
            "the PEM CA that signed the server's certificate (verified, hostname too)"
        ),
        "tablePrefix": {
            "type": "string",
            "pattern": r"^[a-z_][a-z0-9_]{0,40}$",
            "description": "The tables' names start with it (convostore_ unset).",
        },
        "poolMax": _int(1, 1000, "Connections per sidecar (4 unset)."),
        "idleTimeout": _duration(
            "Connections are closed once the store has been idle this long "
            "(30s unset; 0.1s to 24h)."
        ),
        "statementTimeout": _duration(
            "How long a wait for another writer's lock may take (5s unset; 1s to 1h)."
        ),
    },
}


def _backend_rules(backends: list[str], where: str = "") -> list[dict[str, Any]]:
    """CEL rules tying `<where>backend` to its section: a section only with its backend,
    and what each backend cannot do without."""
    needs = {
        "postgres": (
            "has(self.postgres) && has(self.postgres.dsnSecretRef)",
            "postgres.dsnSecretRef",
            "postgres.dsnSecretRef",
        ),
        "redis": (
            "has(self.redis) && (has(self.redis.url) || has(self.redis.urlSecretRef)"
            " || has(self.redis.sentinel) || has(self.redis.cluster))",
            "redis.url, {w}redis.urlSecretRef, {w}redis.sentinel or {w}redis.cluster",
            "redis.url",
        ),
        "sqlalchemy": (
            "has(self.sqlalchemy) && has(self.sqlalchemy.urlSecretRef)",
            "sqlalchemy.urlSecretRef",
            "sqlalchemy.urlSecretRef",
        ),
        "dapr": ("has(self.dapr)", "dapr.stateStore", "dapr.stateStore"),
        "openai": ("has(self.openai)", "openai.apiKeySecretRef", "openai.apiKeySecretRef"),
    }
    rules = [
        {
            "rule": f"self.backend != '{backend}' || ({needs[backend][0]})",
            "message": f"a {backend} backend needs {where}" + needs[backend][1].format(w=where),
            "fieldPath": f".{needs[backend][2]}",
        }
        for backend in backends
        if backend in needs
    ]
    rules += [
        {
            "rule": f"!has(self.{backend}) || self.backend == '{backend}'",
            "message": f"{where}{backend} settings need {where}backend: {backend}",
            "fieldPath": f".{backend}",
        }
        for backend in backends
    ]
    return rules


# what each capability's rule refuses, the verb its message uses, and where it points
CAPABILITY_RULES: dict[Capability, list[tuple[str, str, str]]] = {
    "retention": [("!has(self.retention)", "honour retention", ".retention")],
    "encryption": [
        (
            "!has(self.encryption) || !has(self.encryption.enabled) || !self.encryption.enabled",
            "encrypt at rest",
            ".encryption.enabled",
        )
    ],
    "compaction": [("!has(self.compaction)", "compact", ".compaction")],
    "structure": [
        ("!has(self.labels)", "keep labels on sessions", ".labels"),
        (
            "!has(self.encryption) || !has(self.encryption.subjectLabel)",
            "seal sessions for their subjects, which needs labels",
            ".encryption.subjectLabel",
        ),
    ],
}


def _capability_rules() -> list[dict[str, Any]]:
    """A rule per capability a backend lacks (as `convostore_sidecar.drivers` declares
    it), refusing the settings that need it with the backend's own reason."""
    return [
        {
            "rule": f"self.backend != '{name}' || {refused}",
            "message": f"the {name} backend cannot {verb}: {backend.lacks[capability]}",
            "fieldPath": field,
        }
        for name, backend in DECLARED.items()
        for capability, rules in CAPABILITY_RULES.items()
        if capability in backend.lacks
        for refused, verb, field in rules
    ]


MAPPING_BACKENDS = ["sqlite", "redis", "postgres"]

OPENAI_CLIENT: dict[str, Any] = {
    "baseURL": {
        "type": "string",
        "pattern": r"^(https://[^\s/]+|http://(localhost|127\.[0-9.]+|\[::1\]))(:[0-9]+)?(/[^\s]*)?$",
        "maxLength": 2048,
        "description": "https:// (http:// only to a loopback address): the key goes "
        "with every request.",
    },
    "organization": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,128}$"},
    "project": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,128}$"},
    "timeout": {"type": "string", "pattern": DURATION, "maxLength": 32},
    "maxRetries": _int(0, 10, "Retries of rate-limited and failed calls, with backoff."),
}
"""How the sidecar reaches OpenAI's API, for the openai backend and for compaction."""

COMPACTION: dict[str, Any] = {
    "type": "object",
    "description": "Compact long histories with the Responses API's responses.compact, "
    "atomically in the backend; the originals stay in the session's archive. The sidecar "
    "holds the key.",
    "required": ["apiKeySecretRef"],
    "properties": {
        "apiKeySecretRef": _secret_ref("the OpenAI API key compaction calls the model with"),
        "model": {
            "type": "string",
            "default": "gpt-4.1",
            "pattern": r"^([A-Za-z0-9._-]+/)?(ft:)?(gpt-|o[0-9])[A-Za-z0-9._:-]*$",
            "maxLength": 128,
            "description": "An OpenAI model that compacts (gpt-*, o*, their fine-tunes).",
        },
        **OPENAI_CLIENT,
        "trigger": {
            "type": "object",
            "description": "When to compact: once this many items other than user messages "
            "and summaries are stored (items; 10 by default, as the Agents SDK), or once the "
            "history is estimated at this many tokens (4 bytes each).",
            "properties": {
                "items": _int(1, 1_000_000, "Items other than user messages and summaries."),
                "tokens": _int(1, 100_000_000, "Estimated tokens of the whole history."),
            },
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.items) && has(self.tokens))",
                    "message": "give either items or tokens",
                }
            ],
        },
        "keepRecentTurns": _int(0, 10_000, "The latest user turns that always stay verbatim."),
        "mode": {
            "type": "string",
            "enum": ["auto", "input", "previous_response_id"],
            "default": "auto",
            "description": "How the model gets the history when the agent does not say: "
            "auto chains from the last stored response, else sends the items.",
        },
    },
}

OPENAI: dict[str, Any] = {
    "type": "object",
    "description": "OpenAI's Conversations API; the sidecar holds the key.",
    "required": ["apiKeySecretRef"],
    "properties": {
        "apiKeySecretRef": _secret_ref("the OpenAI API key"),
        **OPENAI_CLIENT,
        "adoptConversations": {
            "type": "boolean",
            "description": "A session id that is a conversation id (conv_...) may name a "
            "conversation no convostore store has marked, such as one the Agents SDK's "
            "OpenAIConversationsSession made: it is marked for this store on first use.",
        },
        "mapping": {
            "type": "object",
            "description": "Where the session to conversation map lives: sqlite (one per "
            "pod) or redis or postgres, shared by every pod of the store.",
            "required": ["backend"],
            "properties": {
                "backend": {"type": "string", "enum": MAPPING_BACKENDS},
                "sqlite": SQLITE,
                "redis": REDIS,
                "postgres": POSTGRES,
            },
            "x-kubernetes-validations": _backend_rules(MAPPING_BACKENDS, "mapping."),
        },
    },
}

SPEC: dict[str, Any] = {
    "type": "object",
    "required": ["backend"],
    "properties": {
        "backend": {"type": "string", "enum": BACKENDS, "description": "Where history lives."},
        "sqlite": SQLITE,
        "redis": REDIS,
        "postgres": POSTGRES,
        "sqlalchemy": SQLALCHEMY,
        "openai": OPENAI,
        "dapr": {
            "type": "object",
            "required": ["stateStore"],
            "properties": {
                "stateStore": {"type": "string", "pattern": NAME, "maxLength": 253},
                "component": {
                    "type": "object",
                    "description": "Create and own this Dapr Component, named stateStore.",
                    "required": ["type"],
                    "properties": {
                        "type": {"type": "string", "pattern": r"^state\.[a-z0-9.-]{1,100}$"},
                        "version": {"type": "string", "default": "v1", "pattern": r"^v[0-9]+$"},
                        "metadata": {
                            "type": "array",
                            "maxItems": 100,
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string", "maxLength": 256},
                                    "value": {"type": "string", "maxLength": 65536},
                                    "secretKeyRef": _secret_ref("the value"),
                                },
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "has(self.value) != has(self.secretKeyRef)",
                                        "message": "give either value or secretKeyRef",
                                    }
                                ],
                            },
                        },
                    },
                },
            },
        },
        "compaction": COMPACTION,
        "retention": {
            "type": "object",
            "properties": {
                "ttl": {
                    "type": "string",
                    "pattern": DURATION,
                    "maxLength": 32,
                    "description": "Idle time after which a session expires, e.g. 24h.",
                },
                "maxItems": _int(1, 10_000_000, "Older items are trimmed on append."),
            },
        },
        "limits": {
            "type": "object",
            "properties": {
                "maxItemBytes": _int(
                    2,
                    2 << 20,
                    "Largest item, serialized (at most 2 MiB: parsed, it takes "
                    "about 30 times that of the sidecar's 256 MiB).",
                ),
                "maxRequestBytes": _int(
                    16,
                    24 << 20,
                    "Largest request body (at most the sidecar's 24 MiB "
                    "budget for bodies in flight).",
                ),
                "maxItemsPerRequest": _int(1, 10_000, "Items in one append."),
                "maxReadItems": _int(
                    1, 1_000_000, "Most items one read returns (the latest; marked truncated)."
                ),
                "maxReadBytes": _int(
                    1 << 10,
                    8 << 20,
                    "Most bytes of items one read returns (the latest; marked truncated); "
                    "at least maxItemBytes, and with it within the sidecar's 16 MiB "
                    "budget for answers in flight.",
                ),
                "maxBranches": _int(1, 100_000, "Branches holding items per session."),
            },
        },
        "labels": {
            "type": "object",
            "description": "The labels sessions may carry (user_id, tenant): what they "
            "are listed and erased by.",
            "properties": {
                "allowed": {
                    "type": "array",
                    "maxItems": 64,
                    "x-kubernetes-list-type": "set",
                    "description": "The label names allowed; without it, any.",
                    "items": {"type": "string", "pattern": f"^{LABEL_NAME.pattern}$"},
                },
                "maxPerSession": _int(1, 64, "Labels one session carries (default 16)."),
                "retention": {
                    "type": "object",
                    "description": "How long a session is kept after its last write, by "
                    "the value of one label (its class): the sweep erases it after that.",
                    "required": ["label", "classes"],
                    "properties": {
                        "label": {"type": "string", "pattern": f"^{LABEL_NAME.pattern}$"},
                        "classes": {
                            "type": "object",
                            "minProperties": 1,
                            "maxProperties": 64,
                            "description": "Each class (a value of the label) to a duration, "
                            "e.g. free: 7d, paid: 90d.",
                            "additionalProperties": {
                                "type": "string",
                                "pattern": DURATION,
                                "maxLength": 32,
                            },
                        },
                    },
                },
            },
        },
        "encryption": {
            "type": "object",
            "properties": {
                "enabled": {"type": "boolean", "default": False},
                "keySecretRef": {
                    "type": "object",
                    "description": "A Secret whose keys are key ids and values base64 keys. "
                    "Without one, the operator generates <name>-convostore-keys.",
                    "required": ["name"],
                    "properties": {"name": {"type": "string", "pattern": NAME}},
                },
                "primary": {"type": "string", "pattern": r"^[A-Za-z0-9._-]{1,64}$"},
                "hideToolNames": {
                    "type": "boolean",
                    "default": False,
                    "description": "Keep tool names out of the backend's structure columns "
                    "too (they are then read from the decrypted items).",
                },
                "subjectLabel": {
                    "type": "string",
                    "pattern": f"^{LABEL_NAME.pattern}$",
                    "description": "Crypto-shredding: the label naming a session's subject "
                    "(e.g. user_id); each subject's items are sealed under a key of their "
                    "own, which erasing them destroys.",
                },
                "requireSubject": {
                    "type": "boolean",
                    "default": False,
                    "description": "Refuse writes to sessions without the subject label.",
                },
            },
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.requireSubject) || !self.requireSubject"
                    " || has(self.subjectLabel)",
                    "message": "requireSubject needs subjectLabel",
                    "fieldPath": ".requireSubject",
                }
            ],
        },
        "deletionPolicy": {
            "type": "string",
            "enum": ["Retain", "Delete"],
            "default": "Retain",
            "description": "Delete purges the store's sessions from the backend.",
        },
    },
    "x-kubernetes-validations": [
        *_backend_rules(BACKENDS),
        *_capability_rules(),
    ],
}

CONDITION: dict[str, Any] = {
    "type": "object",
    "required": ["type", "status"],
    "properties": {
        "type": {"type": "string"},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": {"type": "string"},
        "message": {"type": "string"},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
        "observedGeneration": {"type": "integer"},
    },
}

STATUS: dict[str, Any] = {
    "type": "object",
    "x-kubernetes-preserve-unknown-fields": True,
    "properties": {
        "observedGeneration": {"type": "integer"},
        "phase": {"type": "string", "enum": ["Pending", "Ready", "Degraded", "Failed"]},
        "configHash": {"type": "string"},
        "configSecret": {"type": "string"},
        "backendIdentity": {
            "type": "string",
            "description": "What the store's sessions are keyed by in the backend: "
            "<namespace>/<name>, or <name> alone for a store an older operator rendered.",
        },
        "conditions": {
            "type": "array",
            "items": CONDITION,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    },
}


NAME_RULE: dict[str, Any] = {
    "rule": f"self.metadata.name.size() <= {MAX_STORE_NAME} && "
    f"self.metadata.name.matches('{STORE_NAME}')",
    "message": f"a ConversationStore name must be at most {MAX_STORE_NAME} lowercase letters, "
    "digits or '-' (it names volumes in pods and a store in the sidecar)",
}


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Backend", "type": "string", "jsonPath": ".spec.backend"},
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "x-kubernetes-validations": [NAME_RULE],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": SPEC,
                                "status": STATUS,
                            },
                        }
                    },
                }
            ],
        },
    }
