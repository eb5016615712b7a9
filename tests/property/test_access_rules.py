"""Hypothesis: access rules decide as the documented model says (first match wins).

The model is written here from docs/security.md, "Clients and access control", with
`fnmatch.fnmatchcase` for the globs; `AccessPolicy` compiles the globs into one regular
expression per rule, and must agree with the model on every input.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from hypothesis import given
from hypothesis import strategies as st

from meshcast.group.access import (
    EVERYTHING,
    NOTHING,
    AccessPolicy,
    AccessRule,
    Operation,
    Principal,
)

TOKEN_NAMES = ("readers", "writers", "ops")
# small alphabets so that globs and names often meet
names = st.text("ab.-x", min_size=1, max_size=6)
globs = st.text("ab.-x*?[]!", min_size=1, max_size=6)
principals = st.builds(Principal, names, st.none() | st.sampled_from(TOKEN_NAMES), st.booleans())
rules = st.builds(
    AccessRule,
    st.lists(globs, min_size=1, max_size=3).map(tuple),
    st.frozensets(st.sampled_from(Operation)),
    st.none() | st.lists(globs, min_size=1, max_size=2).map(tuple),
    st.none() | st.lists(st.sampled_from(TOKEN_NAMES), min_size=1, max_size=2).map(tuple),
)
policies = st.builds(
    AccessPolicy, st.just({n: n * 6 for n in TOKEN_NAMES}), st.lists(rules, max_size=5).map(tuple)
)


def model(policy: AccessPolicy, who: Principal, group: str) -> frozenset[Operation]:
    for rule in policy.rules:
        if (
            any(fnmatchcase(group, g) for g in rule.groups)
            and (rule.clients is None or any(fnmatchcase(who.client, c) for c in rule.clients))
            and (rule.tokens is None or who.token in rule.tokens)
        ):
            return rule.allow
    if who.remote and policy.rules:
        return NOTHING
    return EVERYTHING


@given(policies, principals, names)
def test_decisions_follow_the_model(policy: AccessPolicy, who: Principal, group: str) -> None:
    allowed, index = policy.decide(who, group)
    assert allowed == model(policy, who, group)
    if index is not None:  # the deciding rule matches and no earlier one does
        assert policy.rules[index].matches(who.client, who.token, group)
        assert not any(r.matches(who.client, who.token, group) for r in policy.rules[:index])


@given(policies, rules, principals, names)
def test_a_rule_appended_never_changes_a_decision_an_earlier_rule_made(
    policy: AccessPolicy, extra: AccessRule, who: Principal, group: str
) -> None:
    allowed, index = policy.decide(who, group)
    longer = AccessPolicy(policy.tokens, (*policy.rules, extra))
    if index is not None:
        assert longer.decide(who, group) == (allowed, index)


@given(principals, names)
def test_no_rules_allow_everything(who: Principal, group: str) -> None:
    assert AccessPolicy({"readers": "x" * 16}).allowed(who, group) == EVERYTHING
