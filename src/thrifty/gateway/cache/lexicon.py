"""General-English word lists for the semantic cache's guard (none is drawn from an evaluation set).

- STOP, FILLER, LIGHT: words whose presence or absence does not change what a question asks;
- NEGATIONS, NEG_PREFIXES, OPPOSITES: polarity;
- UNITS, MONTHS, PERIODS: numbers and dates, compared as values;
- SYNONYMS: groups of words that mean the same in nearly every request ("begin" / "start",
  "purchase" / "buy"); a swap inside a group is no edit. Words that are only *related* (siblings such as
  "adults" / "children" or "home" / "car") are deliberately absent: they change the question.
"""
from __future__ import annotations

import re
STOP = set("""
a an the and or but if then so of to in on at by for with from into onto about as than that this these those
there here it its it's is are was were be been being am do does did doing done have has had having will would
shall should can could may might must i me my mine myself you your yours yourself we us our ours he him his
she her hers they them their theirs what which who whom whose when where why how whether any some each every
all both either also just only very too quite really much many more most such own same other another up out
off over again once get got getting go going goes way ways one's let's between among
""".split())
FILLER = set("""
um uh erm hmm hi hello hey ok okay so sorry silly quick question please thanks thank cheers well actually
basically like just wondering wonder need want tell know anyone help kindly exactly currently possible
""".split())
NEGATIONS = {"not", "no", "never", "none", "nothing", "nobody", "nowhere", "neither", "nor", "without",
              "cannot", "lack", "lacking", "unable", "non"}  # "non" is what is left of "non-nullable"
NEG_PREFIXES = ("un", "non", "dis", "in", "im", "il", "ir", "de", "anti")
OPPOSITES = [
    ("open", "closed"), ("open", "close"), ("opening", "closing"), ("accept", "decline"), ("accept", "reject"),
    ("approve", "reject"), ("approved", "rejected"), ("approved", "denied"), ("allow", "forbid"),
    ("allowed", "banned"), ("allowed", "forbidden"), ("allowed", "prohibited"), ("include", "exclude"),
    ("included", "excluded"), ("includes", "excludes"), ("cover", "exclude"), ("eat", "avoid"),
    ("safe", "dangerous"), ("on", "off"), ("start", "stop"), ("start", "end"), ("begin", "end"),
    ("enable", "disable"), ("enabled", "disabled"), ("add", "remove"), ("add", "delete"), ("buy", "sell"),
    ("before", "after"), ("increase", "decrease"), ("increase", "reduce"), ("rise", "fall"), ("raise", "lower"),
    ("maximum", "minimum"), ("max", "min"), ("more", "less"), ("more", "fewer"), ("most", "least"),
    ("cheap", "expensive"), ("cheapest", "expensive"), ("win", "lose"), ("pass", "fail"), ("up", "down"),
    ("upgrade", "downgrade"), ("lock", "unlock"), ("public", "private"), ("join", "leave"),
    ("arrive", "depart"), ("arrival", "departure"), ("import", "export"), ("send", "receive"),
    ("sent", "received"), ("subscribe", "unsubscribe"), ("hot", "cold"), ("early", "late"),
    ("earliest", "latest"), ("first", "last"), ("always", "never"), ("encrypt", "decrypt"),
    ("upload", "download"), ("inbound", "outbound"), ("incoming", "outgoing"), ("input", "output"),
    ("above", "below"), ("over", "under"), ("inside", "outside"), ("in", "out"),
    ("with", "without"), ("true", "false"), ("yes", "no"), ("success", "failure"), ("succeed", "fail"),
    ("positive", "negative"), ("gain", "loss"), ("profit", "loss"), ("credit", "debit"), ("deposit", "withdraw"),
    ("lend", "borrow"), ("push", "pull"), ("show", "hide"), ("visible", "hidden"), ("legal", "illegal"),
    ("valid", "invalid"), ("full", "empty"), ("new", "old"), ("young", "old"), ("big", "small"),
    ("large", "small"), ("long", "short"), ("high", "low"), ("fast", "slow"), ("easy", "hard"),
    ("easy", "difficult"), ("good", "bad"), ("best", "worst"), ("better", "worse"), ("right", "wrong"),
    ("right", "left"), ("north", "south"), ("east", "west"), ("morning", "evening"), ("day", "night"),
    ("weekday", "weekend"), ("install", "uninstall"), ("connect", "disconnect"),
    ("login", "logout"), ("sign in", "sign out"), ("mount", "unmount"), ("free", "paid"), ("online", "offline"),
    ("increase", "cut"), ("keep", "cancel"), ("activate", "deactivate"), ("turn on", "turn off"),
    # verbs and modifiers of software that come in opposite pairs
    ("encode", "decode"), ("encoding", "decoding"), ("compress", "decompress"), ("serialize", "deserialize"),
    ("ascending", "descending"), ("asc", "desc"), ("uppercase", "lowercase"), ("upper", "lower"),
    ("expand", "collapse"), ("grant", "revoke"), ("attach", "detach"), ("allow", "deny"), ("accept", "deny"),
    ("append", "prepend"), ("increment", "decrement"), ("enter", "exit"), ("pause", "resume"),
    ("read", "write"), ("horizontal", "vertical"), ("horizontally", "vertically"), ("sync", "async"),
    ("synchronous", "asynchronous"), ("client", "server"), ("local", "remote"), ("local", "global"),
    ("allowlist", "denylist"), ("whitelist", "blacklist"), ("zip", "unzip"), ("freeze", "unfreeze"),
    ("block", "unblock"), ("undo", "redo"), ("head", "tail"), ("prefix", "suffix"), ("leading", "trailing"),
    ("min", "max"), ("minimum", "maximum"), ("inner", "outer"), ("soft", "hard"), ("shallow", "deep"),
    ("mutable", "immutable"), ("stateful", "stateless"), ("static", "dynamic"), ("even", "odd"),
    ("sender", "receiver"), ("upstream", "downstream"), ("staged", "unstaged"), ("stage", "unstage"),
]
OPPOSITE = {}
for _a, _b in OPPOSITES:
    OPPOSITE.setdefault(_a, set()).add(_b)
    OPPOSITE.setdefault(_b, set()).add(_a)

UNITS = {"zero": 0, "none": None, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
          "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
          "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
          "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
          "hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9, "dozen": 12, "half": 0.5,
          "quarter": 0.25, "twice": 2, "double": 2, "triple": 3, "single": 1, "once": 1, "couple": 2,
          "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8,
          "ninth": 9, "tenth": 10, "twelfth": 12, "twentieth": 20, "thirtieth": 30}
MONTHS = set("january february march april may june july august september october november december jan feb mar "
              "apr jun jul aug sep sept oct nov dec monday tuesday wednesday thursday friday saturday sunday "
              "mondays tuesdays wednesdays thursdays fridays saturdays sundays weekday weekdays weekend weekends weeknight "
              "weeknights today tomorrow yesterday tonight weekly monthly yearly daily annual annually fortnightly "
              "spring summer autumn fall winter christmas easter".split())

CONTRACTIONS = [(r"\bcan['’]t\b", "can not"), (r"\bwon['’]t\b", "will not"), (r"\bshan['’]t\b", "shall not"),
                 (r"n['’]t\b", " not"), (r"\bcannot\b", "can not"), (r"['’]re\b", " are"), (r"['’]m\b", " am"),
                 (r"['’]ve\b", " have"), (r"['’]ll\b", " will"), (r"['’]d\b", " would"), (r"['’]s\b", ""),
                 (r"s['’](?=\s|$)", "s")]
# Tokens keep their symbols: "c++", "c#", "f#", ".net", "node.js" (a leading dot only before a letter).
WORD = re.compile(r"(?:(?<![a-z0-9])\.(?=[a-z]))?[a-z0-9]+(?:[.'_][a-z0-9]+)*(?:\+\+|#|\+(?![a-z0-9]))?")
RAW_TOKEN = re.compile(r"(?:(?<![A-Za-z0-9])\.(?=[A-Za-z]))?"
                       r"[A-Za-z0-9£$€%]+(?:[._:/,'’-][A-Za-z0-9]+)*(?:\+\+|#)?")
NUM = re.compile(r"\d+(?:[.,:]\d+)*")


BARE = {"whats": "what is", "hows": "how is", "wheres": "where is", "whos": "who is", "dont": "do not",
         "doesnt": "does not", "didnt": "did not", "cant": "can not", "wont": "will not", "isnt": "is not",
         "arent": "are not", "wasnt": "was not", "shouldnt": "should not", "couldnt": "could not",
         "wouldnt": "would not", "havent": "have not", "hasnt": "has not", "im": "i am", "ive": "i have",
         "youre": "you are", "theres": "there is"}
LEADING_FILLER = re.compile(
    r"^\s*(?:(?:um+|uh+|erm|hmm+|hi|hello|hey|good (?:morning|afternoon|evening)|morning|afternoon|evening|"
    r"ok(?:ay)?|so|right|quick question|sorry[^,.!?]{0,40}|silly question|just wondering|"
    r"i was wondering|i wonder|please|hi there|hey there)\s*[,.!?:-]*\s+)+", re.I)

# Adverbs and hedges that soften or frame a question without narrowing it.
LIGHT = set("""
usually normally typically generally commonly ordinarily actually currently presently exactly precisely roughly
approximately still ever even also perhaps maybe possibly probably ideally simply basically honestly really
definitely certainly anyway somehow steps step process procedure method option options
command best proper correct easiest simplest explain describe use using uses
""".split())

# Phrasal verbs read as one word before matching ("turn on" == "enable"); applied to normalised text.
PHRASES = [(r"\b(?:turn|switch) on\b", "enable"), (r"\b(?:turn|switch) off\b", "disable"),
           (r"\bsign(?:ing|ed)? up\b", "register"), (r"\b(?:log|sign)(?:ging|ged|ed)? in(?:to)?\b", "login"),
           (r"\b(?:log|sign)(?:ging|ged|ed)? out\b", "logout"), (r"\bset(?:ting)? up\b", "setup"),
           (r"\bfind out\b", "find"), (r"\bmoney back\b", "refund"), (r"\bcall off\b", "cancel"),
           (r"\bget rid of\b", "remove"), (r"\be-?mail\b", "email"), (r"\bcell ?phone\b", "mobile"),
           (r"\b(?:right|best|correct|proper|recommended|easiest|simplest) way\b", "way"),
           (r"\bthanks? (?:you )?in advance\b", "thanks")]

# Each group: words that mean the same in nearly every request. Inflected forms are matched by stemming.
SYNONYMS = [
    "start begin commence", "finish complete", "buy purchase", "need require", "obtain acquire",
    "change update modify amend alter edit", "delete remove erase", "fix repair mend", "help assist",
    "show display", "find locate", "check verify", "choose select pick", "book reserve", "booking reservation",
    "cost price charge fee", "shipping delivery postage", "luggage baggage", "kid child children kids",
    "phone telephone", "mobile smartphone", "quick quickly fast rapid rapidly speedy", "big large",
    "small little", "car vehicle automobile", "shop store", "movie film", "medicine medication",
    "holiday vacation", "flat apartment", "lift elevator", "rubbish trash garbage", "refund reimbursement",
    "register enrol enroll", "answer reply respond", "problem issue", "allowed permitted", "allow permit",
    "forbidden prohibited banned", "mandatory compulsory obligatory", "optional voluntary", "free complimentary",
    "cheap inexpensive affordable", "expensive costly pricey", "nearest closest", "wage salary", "bill invoice",
    "parcel package", "postcode zipcode", "tv television", "sofa couch", "tap faucet", "petrol gasoline",
    "motorway highway freeway", "lorry truck", "chemist pharmacy drugstore", "nappy diaper", "torch flashlight",
    "timetable schedule", "maths math mathematics", "enquiry inquiry", "broken faulty", "mute silence",
    "enable activate", "disable deactivate", "setup configure", "author writer", "doctor physician",
    "rules regulations",
    # words of software that mean the same in nearly every request
    "directory folder dir", "dictionary dict", "integer int", "string str", "repository repo",
    "application app", "environment env", "maximum max", "quit exit",
    "element item", "solve resolve", "development dev", "arguments args", "configuration config",
    "parameter param", "documentation docs", "database db", "image picture", "function func",
    "specific particular", "trim strip",
]
SYNONYM: dict[str, str] = {}
for _group in SYNONYMS:
    _ws = _group.split()
    for _w in _ws:
        SYNONYM.setdefault(_w, _ws[0])

# Words for one period of time: "annual" == "yearly"; compared as date values, not as names.
PERIODS = {"annual": "yearly", "annually": "yearly", "yearly": "yearly", "daily": "daily", "everyday": "daily",
           "weekly": "weekly", "monthly": "monthly", "fortnightly": "fortnightly", "hourly": "hourly"}

# Plurals that no suffix rule finds.
IRREGULAR = {"feet": "foot", "teeth": "tooth", "children": "child", "men": "man", "women": "woman",
             "people": "person", "mice": "mouse", "indices": "index", "matrices": "matrix", "vertices": "vertex",
             "criteria": "criterion", "analyses": "analysis", "axes": "axis"}

# Units of measure: two questions that differ in a unit ask for different numbers, whatever the cosine.
UNIT_WORDS = set("""
bit bits byte bytes kb mb gb tb pb kib mib gib tib kilobyte kilobytes megabyte megabytes gigabyte gigabytes
terabyte terabytes kbps mbps gbps ns ms nanosecond nanoseconds microsecond microseconds millisecond
milliseconds second seconds sec secs minute minutes mins hour hours hr hrs day days week weeks month months
year years mm cm m km metre metres meter meters kilometre kilometres kilometer kilometers mile miles inch inches
foot feet ft yard yards ounce ounces oz pound pounds lb lbs gram grams g kg kilogram kilograms ton tons tonne
tonnes litre litres liter liters ml gallon gallons celsius fahrenheit kelvin degree degrees percent px pixel
pixels em rem pt dpi fps hz khz mhz ghz watt watts kw kwh volt volts amp amps
""".split())

# Programming languages, runtimes, data stores, platforms and tools. Two of them are never interchangeable
# ("... in python" / "... in javascript"), so a swap of one for another is never a small edit.
TECH = set("""
python javascript typescript java kotlin scala golang rust ruby php perl swift c c++ c# f# .net haskell elixir
erlang clojure lua julia dart bash zsh powershell sql node node.js deno bun react vue angular svelte
next.js nest.js nuxt django flask fastapi rails laravel jquery numpy pandas polars scipy
matplotlib seaborn plotly pytorch tensorflow keras sklearn httpx axios pytest jest mocha
vitest unittest postgres postgresql mysql mariadb sqlite mongodb redis cassandra dynamodb elasticsearch
bigquery snowflake kafka rabbitmq docker podman kubernetes helm terraform ansible nginx apache caddy git svn
github gitlab bitbucket aws azure gcp heroku vercel netlify linux ubuntu debian fedora centos windows
macos ios android chrome firefox safari vim neovim emacs vscode intellij npm yarn pnpm pip conda poetry
maven gradle cargo webpack vite babel eslint prettier graphql grpc json yaml toml xml csv parquet
excel html css sass tailwind bootstrap
""".split())

# Verbs that only say "get it done" or "look at it": "how do I check / find / see the version", "convert /
# turn a string into a list", "create / make a branch". A question that swaps one of them for another
# usually asks the same; a swap of a noun or an adjective ("adults" / "children", "tuple" / "set",
# "argparse" / "click") changes what is asked, so only swaps among these verbs may pass on a high cosine.
GENERIC_VERBS = set("""
check verify test find locate see view list show display get obtain retrieve access look make create generate
build produce do perform handle deal manage convert turn transform change modify switch set put give use
employ compute calculate determine figure tell know print
""".split())
