"""Personal information and secrets replaced by typed placeholders, counted by type.

E-mail addresses; public IP addresses (v4 and v6: private, loopback and other reserved ranges
identify no one and stay); phone numbers written with separators (+1 (555) 010-9999,
020 7946 0958); payment card numbers (13 to 19 digits passing the Luhn check); secrets: cloud
and service API keys of known shapes, private key blocks, JSON web tokens, and the values of
password/secret/token/api_key assignments.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP_ADDRESS>", "phone": "<PHONE_NUMBER>", "card": "<CREDIT_CARD>",
                "secret": "<SECRET>"}

_SECRETS = re.compile("|".join((
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key ids
    r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",  # GitHub tokens
    r"\bgithub_pat_[A-Za-z0-9_]{22,}\b",
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b",  # Slack
    r"\bAIza[0-9A-Za-z_-]{35}\b",  # Google API keys
    r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}\b",  # OpenAI-style keys
    r"\bsk_live_[0-9A-Za-z]{16,}\b",  # Stripe
    r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b",  # JWT
)))
# key = "value" with a name that says secret: the value goes, the name stays
_ASSIGNED = re.compile(r"""(?i)\b((?:[a-z0-9_]*_)?(?:password|passwd|pwd|secret|api_?key|access_?key|auth_?token|token|private_?key))"""
                       r"""(\s*[:=]\s*)(["'])([^"'\s]{8,})\3""")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}\b")
_IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{1,4})*(?![\w:])")
# not a piece of a longer run of digit groups (a card number failing Luhn, say)
_PHONE = re.compile(r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}"
                    r"(?![\w-])(?![ .-]\d)")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _public_ip(s: str) -> bool:
    try:
        return ipaddress.ip_address(s).is_global
    except ValueError:
        return False


def redact(text: str) -> tuple[str, Counter]:
    """The text with its personal information and secrets replaced, and how many of each type."""
    counts: Counter = Counter()

    def sub(kind: str, pattern: re.Pattern, s: str, keep=lambda m: False) -> str:
        def one(m: re.Match) -> str:
            if keep(m):
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]
        return pattern.sub(one, s)

    def assigned(m: re.Match) -> str:
        if m.group(4) == PLACEHOLDERS["secret"]:
            return m.group(0)
        counts["secret"] += 1
        return f"{m.group(1)}{m.group(2)}{m.group(3)}{PLACEHOLDERS['secret']}{m.group(3)}"

    text = sub("secret", _SECRETS, text)
    text = _ASSIGNED.sub(assigned, text)
    text = sub("email", _EMAIL, text)
    text = sub("card", _CARD, text, keep=lambda m: not luhn(re.sub(r"\D", "", m.group(0))))
    text = sub("ip", _IPV4, text, keep=lambda m: not _public_ip(m.group(0)))
    text = sub("ip", _IPV6, text, keep=lambda m: m.group(0).count(":") < 2 or not _public_ip(m.group(0)))
    text = sub("phone", _PHONE, text, keep=lambda m: not 9 <= sum(c.isdigit() for c in m.group(0)) <= 15)
    return text, counts
