"""The six CORTEX domains and their seed prompts: DOMAIN_PROMPTS[domain]["examples"].

The examples come from the same templates the tiny kit's teacher was trained on, so the plain
trainer and the demo have prompts the kit's teacher answers meaningfully. With real models, any
prompts of the domain serve.
"""

from conch_dna.kit import corpus
from conch_dna.system.domains import DOMAINS, SYSTEM_PROMPTS

DESCRIPTIONS = {
    "thinking": "step-by-step reasoning about why things happen",
    "task": "breaking a request into numbered steps",
    "action": "choosing one tool call, as JSON",
    "reflection": "learning from what went right or wrong",
    "debug": "finding the cause of an error and its fix",
    "memory": "storing and recalling facts about people",
}

DOMAIN_PROMPTS: dict[str, dict] = {
    domain: {
        "description": DESCRIPTIONS[domain],
        "system": SYSTEM_PROMPTS[domain],
        "examples": corpus.prompts(domain, 64, seed=100 + i),
    }
    for i, domain in enumerate(DOMAINS)
}
