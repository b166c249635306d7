"""The fixed topic list offline labels are matched against, as data: ``kind -> name: hint words``.

Kinds: concrete, abstract, format, language (distractor selection keeps concrete ones).
The hints sharpen the embedding of a name; edit this list and rebuild the catalog
(``esr-lab catalog build``) to relabel.
"""

from __future__ import annotations

# kind -> "name: hint words" (the hints sharpen the embedding of the name)
TOPICS = """
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
    for line in TOPICS.strip().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("## "):
            kind = line[3:].strip()
            continue
        name, _, hints = line.partition(":")
        out.append({"name": name.strip(), "hints": hints.strip(), "kind": kind})
    return out
