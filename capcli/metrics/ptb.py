"""A pure-Python stand-in for the PTB tokenizer that pycocoevalcap runs in Java.

The COCO caption metrics are defined on text tokenized by Stanford CoreNLP 3.4.1's
``PTBTokenizer -preserveLines -lowerCase``, after which pycocoevalcap drops the tokens in
its ``PUNCTUATIONS`` list. Without Java, ``simple_ptb_tokenize`` reproduces that output so
BLEU, ROUGE-L and CIDEr-D stay comparable; tests/test_metrics.py pins it against the jar.

It is a small longest-match lexer in the manner of CoreNLP's JFlex grammar (PTBLexer.flex):
at each position every rule is tried, the longest match wins (trailing context counts
towards the length, as in JFlex), and ties go to the earlier rule. Only the rules that
matter for captions are kept: words, contractions (``don't`` → ``do n't``, ``it's`` →
``it 's``), hyphenated words and numbers, abbreviations (``mr.``, ``u.s.``), quotes,
brackets, dashes, ellipses and currency. Known gaps, all rare in captions: URLs, e-mail
addresses, phone numbers and smileys are only approximated, and the jar sometimes looks past
the end of a line (a caption ending in a single-letter abbreviation such as ``a.`` loses its
period when the next caption starts with "He", "The", ...), which a tokenizer that sees one
caption at a time cannot do.

Two quirks of the reference pipeline are reproduced on purpose, because the metrics are
computed on what the reference pipeline produces, not on what it should produce:
``-lowerCase`` also lowercases the bracket escapes (``(`` → ``-lrb-``), so they survive
pycocoevalcap's upper-case ``-LRB-`` filter; and runs such as ``!!`` or ``?!`` are not in
the filter either, so they stay as tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import chain
from typing import NamedTuple

from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

# --- character classes (JFlex's [:letter:] is Java's Character.isLetter, BMP only) ----------
_NOT_LETTERS = r"\u00B2\u00B3\u00B9\u00BC-\u00BE\u2070-\u209F\u2150-\u218F\u2460-\u24FF\U00010000-\U0010FFFF"
_L = rf"[^\W\d_{_NOT_LETTERS}]"  # a letter
_LD = rf"[^\W_{_NOT_LETTERS}]"  # a letter or a digit
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSETC = r"(?:['\u0092\u2019\u0091\u2018\u201B]|&apos;)"  # also seen inside words
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_WORD = rf"(?:{_L}|[\u00AD\u0300-\u036F]|&[aeiouAEIOU](?i:acute|grave|uml);)+"
_ACRO = r"[A-Za-z](?:\.[A-Za-z])+"
_INSENTP = r"[,;:]"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|{_ACRO}\.))+"
_THING_PART = rf"(?:[dDoOlL]{_APOSETC}{_LD})?{_LD}+"
_THING = rf"{_THING_PART}(?:[-_\u058A\u2010\u2011]{_THING_PART})*"
_THINGA = r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+"
_URLCHARS = r"[^ \t\n\f\r\"<>|()]"
_URLEND = r"[^ \t\n\f\r\"<>|.!?(){},-]"

# Abbreviations whose period stays attached (from PTBLexer.flex, "induced from 1987 WSJ").
_ABBREV1 = (
    r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|Mon|Tue|Tues|Wed|Thu|Thurs|Fri"
    r"|Ala|Ariz|Calif|Colo|Conn|Dak|Del|Fla|Ga|Ind|Kans?|Ky|La|Md|Mich|Minn|Mo"
    r"|Mont|Neb|Nev|Okla|Pa|Penn|Tenn|Tex|Va|Vt|Wisc?|Wyo"
    r"|Inc|Cos?|Corp|Pp?tys?|Ltd|Plc|Bancorp|Dept|Bhd|Assn|Univ|Intl|Sys"
    r"|Prop|Ph|tel|est|ext|sq|ft|Jr|Sr|Bros|Ed\.D|Ph\.D|Blvd|Rd|Esq|etc|al|seq"
)
_ABBREV1_CAPITALISED = r"A(?i:rk)|I(?i:ll)|M(?i:ass)|M(?i:iss)|O(?i:re)|W(?i:ash)"  # "ill." is a word
_ABTITLE = (
    r"Mr|Mrs|Ms|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl"
    r"|Pvt|Mt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det"
)
_ABBREV2 = (
    rf"(?:(?i:{_ABTITLE}|vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Invt|Elec|Natl|M[ft]g)|M(?i:iss)|{_ACRO}|[A-Za-z])\."
)
# After a single letter, a period before one of these capitalised words ends the sentence.
_SENTENCE_START = (
    r"About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here|However|If|In|It|Last"
    r"|Many|More|Mr\.|Ms\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Then|There|These"
    r"|They|This|We|When|While|What|Yet|You"
)

_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_CURRENCY = {"\u00A2": "cents", "\u00A3": "#", "\u0080": "$", "\u00A4": "$", "\u20A0": "$", "\u20AC": "$"}
_FRACTIONS = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


def _latex_quotes(token: str, probably_left: bool) -> str:
    """CoreNLP's quote normalisation (latexQuotes): every quote becomes `, ', `` or ''."""
    if probably_left:
        token = re.sub(r"&apos;|'", "`", token)
        token = re.sub(r'"|&quot;', "``", token)
    else:
        token = re.sub(r"&apos;|'", "'", token)
        token = re.sub(r'"|&quot;', "''", token)
    token = re.sub("[\u0091\u2018\u201B\u2039]", "`", token)
    token = re.sub("[\u0092\u2019\u203A]", "'", token)
    token = re.sub("[\u0093\u201C\u00AB]", "``", token)
    return re.sub("[\u0094\u201D\u00BB]", "''", token)


def _left_quote(token: str) -> str:
    return _latex_quotes(token, probably_left=True)


def _right_quote(token: str) -> str:
    return _latex_quotes(token, probably_left=False)


def _keep(token: str) -> str:
    return token


def _no_soft_hyphen(token: str) -> str:
    return token.replace("\u00AD", "")


def _hyphens(token: str) -> str:
    return "--" if 3 <= len(token) <= 4 else token


def _nbsp(token: str) -> str:
    return token.replace(" ", "\u00A0")


class _Rule(NamedTuple):
    pattern: re.Pattern[str]  # group "tok" (if present) is the token; the rest is trailing context
    action: Callable[[str], str]


def _rules(*patterns: str, action: Callable[[str], str] = _keep) -> list[_Rule]:
    """One rule per pattern: Python's ``|`` takes the first alternative that matches, not the
    longest, so alternatives that can overlap are given as separate patterns."""
    return [_Rule(re.compile(p), action) for p in patterns]


def _smiley(token: str) -> str:
    return token.replace("(", "-LRB-").replace(")", "-RRB-")


# Order matters only for ties in length (the earlier rule wins), as in JFlex.
_RULES: tuple[_Rule, ...] = tuple(chain(
    _rules(r"(?P<tok>(?i:can))(?i:not)"),  # cannot → can not
    _rules(r'<\/?!?[A-Za-z][^>"]*>', action=_nbsp),  # SGML-like tags stay whole
    _rules(r"&(?i:MD|mdash|ndash);", r"[\u0096\u0097\u2013\u2014\u2015]", action=lambda _: "--"),
    _rules(r"(?i:&amp;)", action=lambda _: "&"),
    _rules(rf"(?P<tok>{_WORD}){_APOS}(?:[msdMSD]|(?i:re|ve|ll))", action=_no_soft_hyphen),  # it|'s
    _rules(rf"(?P<tok>[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*)(?i:n){_APOSETC}(?i:t)", action=_no_soft_hyphen),  # do|n't
    _rules(rf"(?P<tok>(?i:gon|wan))(?i:na)(?!{_L})",  # gonna → gon na
           rf"(?P<tok>(?i:got))(?i:ta)(?!{_L})",
           rf"(?P<tok>(?i:lem|gim))(?i:me)(?!{_L})"),
    _rules(_WORD, action=_no_soft_hyphen),
    _rules(  # words with an inner or edge apostrophe that stay whole
        rf"{_APOS}(?i:n){_APOS}?", rf"[lLdDjJ]{_APOS}", rf"(?i:dunkin|somethin|ol){_APOS}", rf"{_APOS}(?i:em)",
        rf"[A-HJ-XZn]{_APOSETC}{_L}{{2}}{_L}*", rf"{_APOS}[2-9]0(?i:s)", rf"{_APOS}(?i:till?|cause)",
        rf"{_L}+[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_L}*",
        r"(?i:cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)",
    ),
    _rules(rf"(?P<tok>[yY]{_APOS}){_L}"),  # y'all → y' all
    _rules(rf"(?P<tok>'(?i:t))(?i:is)(?!{_L})"),  # 'tis → 't is
    _rules(rf"(?i:https?)://{_URLCHARS}+{_URLEND}",
           rf"www\.(?:[^ \t\n\f\r\"<>|.!?(){{}},]+\.)+[a-zA-Z]{{2,4}}(?:/{_URLCHARS}+{_URLEND})?",
           rf"(?:[^ \t\n\f\r\"`'<>|.!?(){{}},-_$]+\.)+(?:com|net|org|edu)(?:/{_URLCHARS}+{_URLEND})?",
           r"[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0]*@(?:[^ \t\n\f\r\"<>|().\u00A0]+\.)+[a-zA-Z]{2,4}"),
    _rules(rf"{_WORD}(?:[.!?]{_WORD})+"),  # dog.cat, file.txt (a missing space keeps them whole)
    _rules(r"[#@][A-Za-z]+"),  # #tag, @user
    _rules(r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]", action=_smiley),  # :-) → :--rrb-
    _rules(rf"(?P<tok>{_APOS}(?:[msdMSD]|(?i:re|ve|ll)))[^A-Za-z]", action=_right_quote),  # 's 're ...
    _rules(rf"(?i:n){_APOSETC}(?i:t)", action=_right_quote),  # n't
    _rules(r"\d{1,2}[\-/]\d{1,2}[\-/]\d{2,4}"),  # dates
    _rules(r"[\-+]?\d*(?:[.:,\u00AD\u066B\u066C]\d+)+", r"[\-+]?\d+", action=_no_soft_hyphen),  # numbers
    _rules(r"(?:\d{1,4}[- \u00A0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}", action=_nbsp),  # fractions: 5 7/8
    _rules("[" + "".join(_FRACTIONS) + "]", action=lambda t: _FRACTIONS[t]),
    _rules(r"-(?i:RRB|LRB|RCB|LCB|RSB|LSB)-", r"(?i:C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls)",
           rf"(?i:Cap){_APOS}(?i:n)", rf"(?i:c){_APOS}(?i:est)"),
    _rules(r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"),  # and/or
    _rules(r"[A-Z]*\$", "#"),
    _rules("[" + "".join(_CURRENCY) + "]", action=lambda t: _CURRENCY[t]),
    _rules(rf"(?P<tok>[A-Za-z])\.{_SPACE}+(?:{_SENTENCE_START})(?=\s|$)"),  # "plan B. The" → b .
    _rules(rf"(?:(?i:{_ABBREV1})|{_ABBREV1_CAPITALISED})\."),
    _rules(rf"(?i:nos?|figs?)\.(?={_SPACE}*\d)"),  # "no. 5", "fig. 3"
    _rules(_ABBREV2),
    _rules(rf"(?P<tok>{_ACRO})\s"),  # u.s without its final period
    _rules(r"(?P<tok>'[0-9][0-9])\s"),
    _rules(rf"(?P<tok>{_WORD}\.){_INSENTP}", action=_no_soft_hyphen),  # "dog.," keeps its period
    _rules(r"\(\d{3}\)[ \u00A0]?\d{3}[\- \u00A0]\d{4}", r"\d{3}[\- \u00A0]\d{3}[\- \u00A0]\d{4}",  # phones
           action=lambda t: _smiley(_nbsp(t))),
    _rules(r'(?P<tok>"|&quot;)[A-Za-z0-9$]', action=_left_quote),
    _rules(r'"|&quot;', action=_right_quote),
    _rules(r"[+%&~^|\\=/\u2030\u2031<>]"),
    _rules(r"[()\[\]{}]", action=lambda t: _BRACKETS[t]),
    _rules(r"-+", action=_hyphens),  # --- and ---- become --
    _rules(r"\.{3,5}", r"(?:\.[ \u00A0]){2,4}\.", r"[\u0085\u2026]", action=lambda _: "..."),
    _rules(r"@+", r"#+", r"_+", r"\*+", r"(?:\\\*){1,3}"),
    _rules(r"[,;:]", r"[?!]+", r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA]"),
    _rules(rf"(?P<tok>{_HTHING}\.){_INSENTP}", _HTHING, action=_no_soft_hyphen),  # 12-inch, 5-10
    _rules(rf"(?P<tok>{_THING}\.){_INSENTP}", _THING),  # 1950s, 3x4, o'clock, x86_64
    _rules(rf"(?P<tok>{_THINGA}\.){_INSENTP}", _THINGA, action=lambda t: t.replace("&amp;", "&")),  # AT&T
    _rules(r"(?P<tok>')[A-Za-z][^ \t\n\r\u00A0]", action=_left_quote),  # opening single quote
    _rules(rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))", _APOS, "''",
           "[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091-\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB]{1,2}",
           action=_right_quote),
    _rules("[\u00A5\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00BA\u00D7\u00F7\u2020-\u2023"
           "\u2032-\u2038\u2044\u2100-\u214F\u2190-\u21FF\u2200-\u22FF\u2600-\u26FF]"),
))
_SKIP = re.compile(r"[\s\u00A0\u2000-\u200B\u200E\u200F\u3000\uFEFF\x00]+")
_PLAIN_WORD = re.compile(r"[a-z]+(?=[ \n])")  # fast path: most caption words
_SPECIAL_WORDS = frozenset({"cannot", "gonna", "wanna", "gotta", "lemme", "gimme"})
_DROP = frozenset(PUNCTUATIONS)


def ptb_tokens(text: str) -> list[str]:
    """All PTB tokens of ``text``, lowercased, before pycocoevalcap drops punctuation.

    Characters no rule knows (emoji, for instance) are deleted, as the jar does.
    """
    text += "\n"  # the jar sees each caption followed by a newline (captions._ptb_java sees to the last one)
    tokens: list[str] = []
    pos, end = 0, len(text)
    while pos < end:
        skip = _SKIP.match(text, pos)
        if skip:
            pos = skip.end()
            continue
        plain = _PLAIN_WORD.match(text, pos)
        if plain and plain.group() not in _SPECIAL_WORDS:
            tokens.append(plain.group())
            pos = plain.end()
            continue
        best: tuple[int, str, _Rule] | None = None
        for rule in _RULES:
            m = rule.pattern.match(text, pos)
            if m and m.end() > pos and (best is None or m.end() > best[0]):
                best = (m.end(), m.group("tok") if "tok" in rule.pattern.groupindex else m.group(), rule)
        if best is None:  # untokenizable: the jar deletes it
            pos += 1
            continue
        _, token, rule = best
        tokens.append(rule.action(token).lower())
        pos += len(token)  # the trailing context is scanned again
    return tokens


def simple_ptb_tokenize(text: str) -> str:
    """One caption as pycocoevalcap's ``PTBTokenizer`` returns it, without Java.

    Lowercased PTB tokens joined by single spaces, with the tokens in pycocoevalcap's
    ``PUNCTUATIONS`` list removed (``a dog's ball.`` → ``a dog 's ball``).
    """
    return " ".join(t for t in ptb_tokens(text) if t not in _DROP)
