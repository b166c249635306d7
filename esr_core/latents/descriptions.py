"""Offline, human-readable labels for SAE latents, made from the catalog's own evidence.

Why offline: the usual route (an LLM writes an explanation from top examples) needs a
large model or an API; here the only local models are the small LM and a sentence
embedder. A label is "topic: tok1, tok2, tok3":
- tokens: the latent's most characteristic activating tokens (activation mass x idf
  against corpus frequency, computed in :mod:`esr_core.latents.catalog`);
- topic: the best match, by embedding similarity (all-MiniLM-L6-v2), between an
  evidence string (those tokens, the promoted tokens that are words, and the text just
  before the peak of the top contexts) and a fixed list of topic names below; character
  classes decide format topics (punctuation, numbers, chat markup) directly, since an
  embedder is poor at those;
- confidence: the topic similarity; weak matches are labelled "maybe topic: ..." or
  token-only, and end with "(low confidence)". Each topic has a kind (concrete,
  abstract, format, language) that distractor selection can use.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

HIGH_CONF = 0.38  # cosine above which the topic is stated plainly
MID_CONF = 0.26  # below this only tokens are shown
DENSE = 0.20  # latents active on more than this fraction of tokens are rarely topical
LOW_MARK = " (low confidence)"

# kind -> "name: hint words" (the hints sharpen the embedding of the name)
_TOPICS = """
## concrete
cooking: recipe, bake, stir, oven, kitchen, ingredients
baking: bread, flour, dough, cake, pastry, yeast
food: meal, eat, dish, taste, delicious, dinner
fruit: apple, banana, orange, berries, grapes
vegetables: carrot, potato, onion, lettuce, tomato
meat and fish: beef, chicken, pork, salmon, steak
drinks: coffee, tea, juice, water, beverage
alcohol: wine, beer, whiskey, drunk, bar
coffee: espresso, brew, beans, cup, caffeine
desserts: chocolate, sugar, sweet, ice cream, candy
restaurants: menu, waiter, chef, order, table
weather: rain, sunny, cloudy, forecast, storm, temperature
seasons: winter, summer, spring, autumn, snow
climate change: global warming, emissions, carbon, greenhouse
natural disasters: earthquake, flood, hurricane, tornado, wildfire
volcanoes: lava, eruption, magma, crater
oceans and sea: waves, beach, coast, ship, sailor, tide
rivers and lakes: water, stream, shore, bank, fishing
mountains: peak, climb, summit, hiking, valley
forests and trees: wood, oak, leaves, branches, pine
plants and gardening: garden, seeds, soil, flowers, grow
flowers: rose, bloom, petals, tulip, garden
animals: dog, cat, horse, wild animal, creature
dogs: puppy, bark, leash, breed, pet
cats: kitten, meow, purr, feline
birds: eagle, feathers, nest, fly, wings
insects: bee, ant, butterfly, spider, bug
fish and marine life: shark, whale, dolphin, coral
farm animals: cow, sheep, pig, goat, chicken, cattle
horses: riding, saddle, stable, gallop
pets: pet owner, vet, adopt, feed
sports: game, team, player, score, match, win
football (soccer): goal, striker, league, penalty, pitch
american football: quarterback, touchdown, NFL
basketball: NBA, dunk, court, hoop
baseball: pitcher, inning, home run, bat
tennis: serve, racket, Wimbledon, set
golf: course, putt, hole, club
running and fitness: marathon, jog, exercise, workout, gym
olympics: medal, athlete, gold, champion
cycling: bicycle, bike, ride, pedal
swimming: pool, swim, stroke, lap
cars and driving: car, vehicle, engine, road, driver, traffic
trains and railways: train, station, rail, locomotive
airplanes and flight: plane, airport, pilot, flight, wing
ships and boats: boat, sail, harbor, vessel, crew
roads and transport: highway, bus, transport, commute
bicycles: bike, wheel, cycling
space and astronomy: planet, star, galaxy, orbit, moon, telescope
rockets and space travel: NASA, astronaut, launch, spacecraft
physics: energy, force, particle, quantum, gravity
chemistry: molecule, chemical, reaction, acid, element
biology: cells, organism, evolution, species, gene
genetics and DNA: gene, chromosome, mutation, heredity
medicine: doctor, patient, treatment, hospital, disease
diseases: cancer, infection, virus, symptoms, illness
vaccines: vaccine, immunization, dose, shot, immunity
pandemics: covid, outbreak, epidemic, flu
mental health: depression, anxiety, therapy, stress
nutrition and diet: calories, vitamins, protein, healthy eating
anatomy: heart, brain, lungs, bones, muscles, blood
hospitals: nurse, surgery, emergency, ward
drugs and pharmaceuticals: pills, medication, prescription, dosage
illegal drugs: cocaine, heroin, marijuana, addiction
sleep: bed, dream, tired, night, rest
body parts: hands, eyes, face, head, feet
clothing and fashion: dress, shirt, shoes, wear, style
jewellery: ring, necklace, gold, diamond
houses and homes: house, room, door, window, roof
furniture: chair, table, bed, sofa, desk
cleaning and chores: wash, clean, laundry, dishes, vacuum
tools and repair: hammer, screwdriver, fix, tools, drill
construction and building: builder, concrete, bricks, architecture
cities and urban life: city, streets, downtown, buildings
villages and countryside: village, rural, farm, fields
travel and tourism: trip, hotel, vacation, tourist, passport
geography: country, region, continent, border, map
countries: France, China, India, nation
united states: American, states, Washington, USA
britain: British, London, England, UK
europe: European, Germany, Italy, Spain
asia: Japan, China, Korea, Asian
africa: African, Nigeria, Kenya, Egypt
middle east: Israel, Iran, Iraq, Arab
money and finance: money, dollars, bank, pay, cost
banking: loans, interest, deposit, credit
stock market: shares, investors, trading, stocks, market
economy: growth, inflation, GDP, recession
business and companies: company, CEO, firm, industry, profit
jobs and employment: work, job, salary, hire, career
shopping and retail: store, buy, price, customer, sale
real estate: property, rent, mortgage, housing
taxes: tax, IRS, revenue, income tax
computers: computer, software, hardware, laptop
programming: code, function, variable, python, bug
internet and web: website, online, browser, email, web
smartphones: phone, app, mobile, iPhone, android
artificial intelligence: AI, machine learning, neural network, model, robot
video games: gaming, player, console, level
social media: facebook, twitter, post, followers
cybersecurity and hacking: hacker, password, security breach
electricity and energy: power, electric, battery, grid
oil and gas: petroleum, fuel, drilling, pipeline
machines and engineering: machine, engine, mechanical, design
chemistry lab: experiment, test tube, sample
mathematics: equation, number, theorem, algebra, geometry
statistics and data: data, percent, average, survey, rate
measurement and units: meters, kilograms, miles, inches, degrees
time and dates: day, week, month, year, o'clock, calendar
numbers and counting: one, two, three, hundred, thousand, digits
colors: red, blue, green, yellow, color
shapes and sizes: big, small, round, square, large
music: song, band, album, guitar, sing, concert
musical instruments: piano, violin, drums, guitar
film and movies: movie, actor, director, scene, Hollywood
television: TV, show, episode, series, channel
theatre and drama: stage, play, actor, scene, audience
literature and books: novel, author, book, chapter, read
poetry: poem, verse, rhyme, poet
painting and visual art: painting, artist, canvas, museum
photography: camera, photo, picture, lens
dance: dancing, ballet, dancer
celebrities: star, famous, fame, paparazzi
news and journalism: reporter, newspaper, media, press, story
publishing: editor, magazine, publish, article
education and schools: school, students, teacher, class, lesson
universities: college, professor, degree, campus
exams and studying: test, exam, study, grades
children and childhood: kids, child, baby, toys, parents
family: mother, father, son, daughter, family
marriage and weddings: wedding, bride, husband, wife
romance and love: love, kiss, heart, romantic, darling
friendship: friend, buddy, together
death and funerals: death, died, funeral, grave, mourning
birth and pregnancy: pregnant, baby, birth, mother
aging and old age: elderly, old, retirement, age
holidays and celebrations: Christmas, birthday, party, holiday
war and military: army, soldiers, war, battle, troops
weapons: gun, rifle, sword, missile, bomb
navy and ships of war: fleet, navy, warship, admiral
terrorism: attack, terrorist, bombing, extremist
crime: criminal, theft, murder, robbery, stolen
police: officer, arrest, cop, investigation
courts and law: court, judge, trial, lawyer, verdict, legal
prisons: jail, prisoner, sentence, inmate
politics: government, political, party, election, vote
elections: vote, ballot, campaign, candidate, poll
parliament: MP, House of Commons, minister, debate, bill
us congress: senate, congress, senator, legislation
presidents and leaders: president, prime minister, leader
diplomacy: foreign policy, treaty, ambassador, negotiations
immigration: immigrants, border, refugees, visa
protests and activism: protest, rally, demonstration, rights
civil rights: equality, discrimination, racism, freedom
kings and royalty: king, queen, prince, throne, crown, royal
history: ancient, century, empire, historical
ancient rome and greece: Roman, Greek, Caesar, Athens
medieval times: knights, castle, lord, sword
religion: God, faith, church, prayer, worship
christianity and the bible: Jesus, Christ, Lord, gospel, biblical
biblical narrative: thou, thee, hath, unto, begat, Israel
islam: Muslim, mosque, Allah, Quran
judaism: Jewish, synagogue, rabbi, Torah
buddhism and hinduism: Buddha, temple, karma, meditation
heaven and hell: angels, devil, soul, sin, salvation
mythology: gods, myth, legend, Zeus
magic and fantasy: wizard, spell, dragon, witch
ghosts and horror: ghost, haunted, monster, fear
science fiction: alien, future, robot, spaceship
shakespeare and old drama: thou, thy, lord, enter, exeunt, hath
philosophy: ethics, truth, reason, existence, mind
psychology: behaviour, mind, cognitive, personality
emotions: feel, happy, sad, angry, emotion
happiness and joy: happy, joy, smile, laugh, delight
sadness and grief: sad, tears, cry, sorrow, grief
anger: angry, rage, furious, hate
fear and anxiety: afraid, scared, worried, nervous
humor and jokes: joke, funny, laugh, humor, pun
insults and rudeness: stupid, idiot, rude, insult
politeness and gratitude: please, thank you, thanks, sorry
greetings: hello, hi, good morning, welcome
advice and instructions: should, tips, steps, how to
questions and asking: what, why, how, question
agreement and disagreement: yes, no, agree, disagree
certainty and doubt: maybe, perhaps, certainly, probably
negation: not, never, no, nothing, none
causality and reasoning: because, therefore, so, reason
comparison: more than, less, better, worse, similar
quantities: many, few, some, all, most, amount
location and direction: north, south, left, right, above, near
movement: go, walk, run, move, travel
speech and communication: said, told, asked, talk, speak
reading and writing: write, read, letter, words, text
languages and linguistics: language, English, French, grammar, word
names of people: John, Mary, Smith, Mr, Mrs
titles and honorifics: Mr, Mrs, Dr, Sir, Lady
places and place names: town, city names, street, county
organizations: association, institute, committee, council
companies and brands: Google, Apple, Microsoft, Amazon
health tweets and news: health news, study finds, risk, patients
movie reviews: film, plot, acting, review, characters
advertising and marketing: ad, brand, marketing, campaign
environment and pollution: pollution, waste, recycling, environment
agriculture: farming, crops, harvest, farmers
energy and climate policy: renewable, solar, wind power
technology industry: tech, startup, innovation
science and research: study, research, scientists, experiment
space missions: mission, satellite, orbit, NASA
telecommunications: telephone, radio, signal, broadcast
mail and letters: post, mail, envelope, letter
safety and danger: danger, risk, safe, warning
accidents and injuries: crash, injured, accident, wound
fire: fire, flames, burn, smoke
light and darkness: light, dark, shadow, bright
sound and noise: sound, loud, noise, quiet
smell and taste: smell, taste, scent, flavor
water: water, wet, liquid, drink
heat and cold: hot, cold, warm, freezing, heat
materials: wood, metal, plastic, glass, stone
gold and treasure: gold, silver, treasure, jewels
gambling and games of chance: bet, casino, poker, dice
board games and puzzles: chess, cards, puzzle
toys: doll, teddy, toy
anarchism and revolution: anarchy, state, revolution, freedom, workers
labour and unions: union, strike, workers, wages
hacker culture and jargon: hacker, kludge, hack, jargon, unix
fortune-cookie sayings: proverb, wisdom, saying, quote
## abstract
morality and ethics: good, evil, moral, right, wrong
freedom and rights: liberty, freedom, rights
power and authority: power, control, authority, rule
truth and lies: truth, lie, honest, deceive
beauty: beautiful, pretty, lovely, elegant
success and failure: success, fail, achieve, win, lose
change and transformation: change, become, transform
beginnings and endings: begin, start, end, finish
time passing: ago, soon, later, before, after
possibility and ability: can, could, able, might
obligation: must, should, have to, need
desire and wanting: want, wish, hope, desire
knowledge and learning: know, learn, understand, knowledge
memory: remember, forget, memory, recall
importance: important, significant, key, crucial
difficulty: hard, difficult, easy, simple, challenge
problems and solutions: problem, solution, solve, issue
help and support: help, assist, support, aid
## format
punctuation: comma, period, quotes, colon, semicolon
numbers and digits: 0, 1, 2, 1990, 50%, digits
dates and years: 1990, 2015, January, century
lists and enumeration: first, second, bullet points, 1., 2.
line breaks and layout: newline, paragraph, blank line, indentation
code syntax: brackets, parentheses, semicolon, braces, equals
urls and web addresses: http, www, .com, link
hashtags and mentions: #, @, hashtag, retweet
capital letters and acronyms: USA, NASA, BBC, abbreviations
quotations and dialogue: "said", quote marks, speaker
markdown formatting: **, ##, bold, heading, bullet
end of text: end of document, eos, separator
subword fragments: word pieces, partial words, suffix, prefix
## language
function words: the, a, of, and, to, in
pronouns: he, she, it, they, we, you, I
verbs of being: is, was, are, were, be
past tense: was, had, did, went, said
plural nouns: -s endings, many things
adjectives: good, great, new, old, big
adverbs: very, really, quickly, just, also
prepositions: in, on, at, from, with, by
conjunctions: and, but, or, because, although
articles and determiners: the, a, an, this, that
possessives: his, her, their, my, 's
first person: I, me, my, we, our
second person: you, your, yourself
archaic english: thou, thee, thy, hath, doth
french words: le, la, de, et, est
spanish words: el, los, que, por, para
german words: der, die, und, ist
"""


def topics() -> list[dict]:
    """The topic list: [{"name", "hints", "kind"}]."""
    out, kind = [], "concrete"
    for line in _TOPICS.strip().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("## "):
            kind = line[3:].strip()
            continue
        name, _, hints = line.partition(":")
        out.append({"name": name.strip(), "hints": hints.strip(), "kind": kind})
    return out


_SPECIAL = re.compile(r"^<\|?[^<>]{1,30}\|?>$")


def display_token(tok: str) -> str:
    """A readable, still-raw form of a token for labels (whitespace made visible)."""
    if tok == "":
        return "''"
    if tok.strip() == "":
        return tok.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "␣")
    s = tok.strip()
    if any(c.isalnum() for c in s):
        return s
    return f"'{s}'"


def _char_class(tok: str) -> str:
    s = tok.strip()
    if not s:
        return "space"
    if _SPECIAL.match(s):
        return "special"
    if all(c.isdigit() or c in ".,%" for c in s) and any(c.isdigit() for c in s):
        return "digit"
    if all(unicodedata.category(c)[0] in "PS" for c in s):
        return "punct"
    if any(c.isalpha() for c in s):
        return "word"
    return "other"


def _words(tokens: list[str], n: int) -> list[str]:
    seen, out = set(), []
    for t in tokens:
        d = display_token(t)
        key = d.lower()
        if key in seen:
            continue
        seen.add(key)
        out.append(d)
        if len(out) >= n:
            break
    return out


def _format_topic(tokens: list[str]) -> tuple[str, str] | None:
    """Topics an embedder cannot see: decided from the character classes of the top tokens."""
    top = tokens[:5]
    if not top:
        return None
    classes = [_char_class(t) for t in top]
    n = len(classes)
    if classes.count("special") >= max(1, n // 2):
        return "chat markup", "format"
    if classes.count("digit") >= (n + 1) // 2 + (n > 2):
        return "numbers and digits", "format"
    if classes.count("space") >= (n + 1) // 2:
        return "line breaks and layout", "format"
    if classes.count("punct") + classes.count("space") >= max(3, (n * 3 + 3) // 4):
        return "punctuation", "format"
    if sum(t.strip().lower() in STOPWORDS for t in top) >= max(3, n - 1):
        return "function words", "language"
    return None


def _clean(text: str) -> str:
    return re.sub(r"<\|[^<>|]{1,30}\|>", " ", text).replace("\n", " ").strip()


STOPWORDS = set("""a an the and or but if of to in on at by for with from as is are was were be been being
it its this that these those he she they we you i me him her them us my your his their our not no so
do does did have has had will would can could should may might than then there here which who whom what
when where why how all any some such into over under about after before up down out off again just
also very s 's t""".split())


def _is_fragment(tok: str) -> bool:
    """A word piece that continues a word (no leading space, starts lowercase)."""
    return bool(tok) and tok[0].isalpha() and tok[0].islower() and len(tok.strip()) <= 6


def _vector_cache_path():
    from esr_core.paths import cache_subdir

    return cache_subdir("labels") / "string_vectors.npz"


def embed_cached(strings: list[str], batch: int = 256, progress=None, cancel=None) -> np.ndarray:
    """Embeddings of short strings, remembered across builds in the user cache."""
    from esr_core.latents.catalog import _check_cancel
    from esr_core.models.embeddings import embed

    path = _vector_cache_path()
    known: dict[str, np.ndarray] = {}
    if path.exists():
        try:
            z = np.load(path, allow_pickle=False)
            known = dict(zip(z["strings"].tolist(), z["vecs"]))
        except (OSError, ValueError, KeyError):
            known = {}
    todo = [x for x in dict.fromkeys(strings) if x not in known]
    for a in range(0, len(todo), batch):
        _check_cancel(cancel)
        chunk = todo[a : a + batch]
        for x, v in zip(chunk, embed(chunk, batch_size=batch)):
            known[x] = v.astype(np.float16)
        if progress:
            progress(min(1.0, (a + batch) / max(1, len(todo))), f"embedded {min(a + batch, len(todo))}/{len(todo)} evidence strings")
    if todo:
        import io

        from esr_core.io import atomic_write_bytes

        keys = list(known)
        buf = io.BytesIO()
        np.savez(buf, strings=np.array(keys), vecs=np.stack([known[k] for k in keys]).astype(np.float16))
        atomic_write_bytes(path, buf.getvalue())
    if not strings:
        return np.zeros((0, 384), np.float32)
    return np.stack([known[x] for x in strings]).astype(np.float32)


def _token_key(tok: str) -> str | None:
    """The string embedded for a token: stripped text; None for markup and empty pieces."""
    s = _clean(tok)
    return s or None


def describe_latent(words: list[str], topic: str, kind: str, conf: float, density: float) -> tuple[str, bool]:
    """The label string and whether it is low-confidence."""
    toks = ", ".join(words[:3]) if words else "(no clear tokens)"
    low = conf < HIGH_CONF or not words or density > DENSE
    if density > DENSE:
        base = f"frequent ({density:.0%} of tokens): {toks}"
    elif conf >= MID_CONF and topic:
        base = f"{topic}: {toks}" if not low else f"maybe {topic}: {toks}"
    else:
        base = toks
    return base + (LOW_MARK if low else ""), low


def describe_catalog(cat, progress: Callable[[float, str], None] | None = None, cancel=None,
                     batch: int = 256, snippets: bool | None = None) -> tuple[dict, np.ndarray]:
    """Label every latent of a :class:`~esr_core.latents.catalog.Catalog`.

    Returns (label columns, search vectors [d_sae, 384]). Why token averages: embedding
    one evidence sentence per latent costs minutes per thousand latents on a busy CPU,
    while the distinct top tokens of a whole SAE are a few thousand short strings; a
    latent's evidence vector is the score-weighted mean of its top tokens' embeddings
    (+ its promoted words, + the text before its peak for SAEs of <= 4096 latents).
    The search vector of a label is the mean of its topic's and its shown tokens' vectors.
    """
    from esr_core.latents.catalog import _check_cancel
    from esr_core.models.embeddings import embed

    d = cat.d_sae
    if snippets is None:
        snippets = d <= 4096
    tl = topics()
    temb = embed([f"{t['name']}: {t['hints']}" for t in tl])
    topic_row = {t["name"]: j for j, t in enumerate(tl)}
    live = [i for i in range(d) if not cat.dead[i]]
    tt_ids = cat._a("top_tok_ids")
    tt_sc = cat._a("top_tok_scores").astype(np.float32)
    pr_ids = cat._a("promo_ids")
    # distinct strings to embed
    key_of: dict[int, str | None] = {}
    promo_of: dict[int, list[str]] = {}
    strings: dict[str, int] = {}
    for i in live:
        for t in tt_ids[i][:8]:
            if t >= 0 and int(t) not in key_of:
                key_of[int(t)] = _token_key(cat.token_str(t))
        pw = []
        for t in pr_ids[i]:
            raw = cat.token_str(t)
            w = raw.strip()
            if raw[:1] == " " and w.isalpha() and len(w) >= 3:
                pw.append(w)
        promo_of[i] = pw[:5]
    for k in list(key_of.values()) + [w for v in promo_of.values() for w in v]:
        if k and k not in strings:
            strings[k] = len(strings)
    # latents whose top tokens are word pieces: label with the whole words at their peaks
    words_of: dict[int, list[str]] = {}
    for i in live:
        acts = [cat.token_str(t) for t in tt_ids[i][:5] if t >= 0]
        pw = [w for w, _ in cat.peak_words(i, "text")][:6]
        inside = sum(any(a.strip() and a.strip() != w and a.strip() in w for w in pw) for a in acts[:3])
        if acts and pw and (inside >= 2 or sum(_is_fragment(t) for t in acts) >= max(2, (len(acts) + 1) // 2)):
            if pw:
                words_of[i] = pw
                for w in pw[:3]:
                    if w not in strings:
                        strings[w] = len(strings)
    snip = {}
    if snippets:
        for i in live:
            ss = [_clean(x) for x in cat.snippets(i, "text", 2)]
            ss = [x for x in ss if x]
            if ss:
                snip[i] = " | ".join(ss)
    todo = list(strings) + list(snip.values())
    vecs = embed_cached(todo, batch=batch, cancel=cancel,
                        progress=(lambda f, m: progress(0.9 * f, m)) if progress else None)
    svec = {i: vecs[len(strings) + j] for j, i in enumerate(snip)}
    cols = {"description": [""] * d, "topic": [""] * d, "topic_kind": [""] * d,
            "confidence": [0.0] * d, "low_confidence": [True] * d}
    search = np.zeros((d, temb.shape[1]), np.float32)
    n_tok = int(cat.meta.get("n_tokens", 0))
    for i in range(d):
        if cat.dead[i]:
            cols["description"][i] = f"dead: never active on the {n_tok:,} evaluated tokens"
            cols["topic_kind"][i] = "dead"
    for n_done, i in enumerate(live):
        acts = [cat.token_str(t) for t in tt_ids[i] if t >= 0]
        ev = np.zeros(temb.shape[1], np.float32)
        for t, w in zip(tt_ids[i][:8], tt_sc[i][:8]):
            k = key_of.get(int(t)) if t >= 0 else None
            if k:
                ev += float(w) * vecs[strings[k]]
        nrm = np.linalg.norm(ev)
        ev = ev / nrm if nrm > 0 else ev
        if i in words_of:
            wv = np.mean([vecs[strings[w]] for w in words_of[i][:3]], axis=0)
            ev = ev + wv / max(np.linalg.norm(wv), 1e-8)
        if promo_of[i]:
            pv = np.mean([vecs[strings[w]] for w in promo_of[i]], axis=0)
            ev = ev + 0.5 * pv / max(np.linalg.norm(pv), 1e-8)
        if i in svec:
            ev = ev + svec[i]
        ev = ev / max(np.linalg.norm(ev), 1e-8)
        sims = temb @ ev
        j = int(np.argmax(sims))
        conf = float(sims[j])
        topic, kind = tl[j]["name"], tl[j]["kind"]
        fmt = _format_topic(acts)
        if fmt is not None:
            topic, kind = fmt
            conf = max(conf, HIGH_CONF)
        words = words_of[i][:3] if i in words_of else _words(acts, 3)
        desc, low = describe_latent(words, topic, kind, conf, float(cat.density[i]))
        cols["description"][i] = desc
        cols["topic"][i] = topic
        cols["topic_kind"][i] = kind
        cols["confidence"][i] = round(conf, 3)
        cols["low_confidence"][i] = low
        sv = np.zeros(temb.shape[1], np.float32)
        shown = [strings[w] for w in words_of[i][:3]] if i in words_of else \
            [strings[key_of[int(t)]] for t in tt_ids[i][:3] if t >= 0 and key_of.get(int(t))]
        for j in shown:
            sv += vecs[j]
        sv = sv / max(np.linalg.norm(sv), 1e-8)
        if conf >= MID_CONF and topic in topic_row:
            sv = sv + temb[topic_row[topic]]
        search[i] = sv / max(np.linalg.norm(sv), 1e-8)
        if progress and n_done % 2000 == 0:
            progress(0.9 + 0.1 * n_done / max(1, len(live)), f"labelled {n_done}/{len(live)} latents")
    if progress:
        progress(1.0, f"labelled {len(live)} live latents")
    return cols, search


def relabel(path, progress=None) -> None:
    """Recompute the offline labels of a catalog on disk (after changing the topic list)."""
    from esr_core.latents.catalog import Catalog, write_descriptions

    cat = Catalog.load(path, overlay=False)
    cols, search = describe_catalog(cat, progress=progress)
    write_descriptions(path, cols, search)
