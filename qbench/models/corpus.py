"""The synthetic corpus glm-tiny is trained on: generated from a seed, nothing downloaded.

Three kinds of line, mixed:

* English-like sentences from a small grammar with number agreement ("the red cats see a dog .");
* Chinese-like sentences from a grammar over real Han characters ("小猫看见了一个红色的球。");
* two-digit additions ("37+45=82"), which give a task whose exact-match accuracy quantization can hurt.

The grammar is small enough that a 3M-parameter model learns it in minutes on a CPU, and rich enough
(agreement, optional phrases, carries in the sums) that its next-token distributions are neither uniform
nor one-hot, so quantization error shows up in perplexity and KL divergence the way it does in real models.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

EN_DET_SG = ["the", "a", "this", "every", "one"]
EN_DET_PL = ["the", "some", "these", "many", "two", "three"]
EN_ADJ = ["red", "small", "old", "happy", "quiet", "bright", "green", "heavy", "quick", "tired"]
EN_NOUN = {
    "cat": "cats",
    "dog": "dogs",
    "bird": "birds",
    "teacher": "teachers",
    "child": "children",
    "farmer": "farmers",
    "robot": "robots",
    "river": "rivers",
    "ball": "balls",
    "book": "books",
    "house": "houses",
    "tree": "trees",
    "apple": "apples",
    "letter": "letters",
}
EN_ANIMATE = ["cat", "dog", "bird", "teacher", "child", "farmer", "robot"]
EN_VERB_T = {
    "see": "sees",
    "find": "finds",
    "like": "likes",
    "carry": "carries",
    "draw": "draws",
    "watch": "watches",
    "follow": "follows",
    "want": "wants",
}
EN_VERB_I = {"sleep": "sleeps", "run": "runs", "sing": "sings", "wait": "waits", "laugh": "laughs"}
EN_PREP = ["near", "under", "behind", "with", "beside"]
EN_ADV = ["slowly", "today", "again", "quietly", "at night"]

ZH_SUBJ = ["小猫", "小狗", "老师", "孩子", "农民", "机器人", "我", "你", "他", "她", "我们", "朋友"]
ZH_OBJ = ["球", "书", "苹果", "房子", "树", "信", "花", "鱼", "水", "饭"]
ZH_ADJ = ["红色", "小", "旧", "新", "绿色", "大", "重", "好看"]
ZH_VERB = ["看见", "喜欢", "找到", "拿着", "画", "想要", "吃", "买"]
ZH_TIME = ["今天", "昨天", "明天", "晚上", "早上"]
ZH_PLACE = ["在家里", "在河边", "在树下", "在学校", "在路上"]
ZH_MEASURE = {
    "球": "个",
    "书": "本",
    "苹果": "个",
    "房子": "座",
    "树": "棵",
    "信": "封",
    "花": "朵",
    "鱼": "条",
    "水": "杯",
    "饭": "碗",
}
ZH_NUM = ["一", "两", "三", "几"]


def _english(rng: random.Random) -> str:
    plural = rng.random() < 0.4
    noun = rng.choice(EN_ANIMATE)
    words = [rng.choice(EN_DET_PL if plural else EN_DET_SG)]
    if rng.random() < 0.5:
        words.append(rng.choice(EN_ADJ))
    words.append(EN_NOUN[noun] if plural else noun)
    if rng.random() < 0.65:
        base = rng.choice(list(EN_VERB_T))
        words.append(base if plural else EN_VERB_T[base])
        obj_plural = rng.random() < 0.4
        obj = rng.choice(list(EN_NOUN))
        words.append(rng.choice(EN_DET_PL if obj_plural else EN_DET_SG))
        if rng.random() < 0.4:
            words.append(rng.choice(EN_ADJ))
        words.append(EN_NOUN[obj] if obj_plural else obj)
    else:
        base = rng.choice(list(EN_VERB_I))
        words.append(base if plural else EN_VERB_I[base])
    if rng.random() < 0.35:
        words += [rng.choice(EN_PREP), "the", rng.choice(list(EN_NOUN))]
    if rng.random() < 0.25:
        words.append(rng.choice(EN_ADV))
    return " ".join(words) + " ."


def _chinese(rng: random.Random) -> str:
    out = []
    if rng.random() < 0.4:
        out.append(rng.choice(ZH_TIME))
    out.append(rng.choice(ZH_SUBJ))
    if rng.random() < 0.3:
        out.append(rng.choice(ZH_PLACE))
    out.append(rng.choice(ZH_VERB))
    if rng.random() < 0.5:
        out.append("了")
    obj = rng.choice(ZH_OBJ)
    out.append(rng.choice(ZH_NUM) + ZH_MEASURE[obj])
    if rng.random() < 0.5:
        out.append(rng.choice(ZH_ADJ) + "的")
    out.append(obj)
    return "".join(out) + "。"


def _addition(rng: random.Random) -> str:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}={a + b}"


def lines(seed: int, n: int) -> Iterator[str]:
    """``n`` corpus lines, deterministic in ``seed``: 40% English, 35% Chinese, 25% additions."""
    rng = random.Random(seed)
    for _ in range(n):
        r = rng.random()
        if r < 0.40:
            yield _english(rng)
        elif r < 0.75:
            yield _chinese(rng)
        else:
            yield _addition(rng)


def text(seed: int, n: int) -> str:
    return "\n".join(lines(seed, n)) + "\n"


def addition_prompts(seed: int, n: int) -> list[tuple[str, str]]:
    """``n`` (prompt, expected answer) pairs such as ("37+45=", "82"), for the exact-match task."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append((f"{a}+{b}=", str(a + b)))
    return out
