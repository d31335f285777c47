/**
 * A small cron-expression matcher (UTC) for `kv.cron()`: Deno.cron's 5-field
 * strings (`minute hour day-of-month month day-of-week`) and its object form,
 * plus a 6-field form with seconds first for schedules finer than a minute.
 * No dependencies, so it can be imported by URL.
 *
 * @module
 */

/** One field of Deno.cron's object form. */
export type CronScheduleExpression =
  | number
  | { exact: number | number[] }
  | { start?: number; end?: number; every?: number };

/** Deno.cron's object form of a schedule. */
export interface CronSchedule {
  minute?: CronScheduleExpression;
  hour?: CronScheduleExpression;
  dayOfMonth?: CronScheduleExpression;
  month?: CronScheduleExpression;
  dayOfWeek?: CronScheduleExpression;
}

/** A parsed schedule: the allowed values of each field. */
export interface Cron {
  /** The schedule as a cron string (5 fields, or 6 with seconds first). */
  source: string;
  seconds: ReadonlySet<number>;
  minutes: ReadonlySet<number>;
  hours: ReadonlySet<number>;
  days: ReadonlySet<number>;
  months: ReadonlySet<number>;
  weekdays: ReadonlySet<number>;
  /** Day-of-month and day-of-week both restricted: either may match (cron's rule). */
  eitherDay: boolean;
}

const FIELDS = [
  { name: "second", min: 0, max: 59 },
  { name: "minute", min: 0, max: 59 },
  { name: "hour", min: 0, max: 23 },
  { name: "day of month", min: 1, max: 31 },
  { name: "month", min: 1, max: 12 },
  { name: "day of week", min: 0, max: 7 },
] as const;

function parseField(text: string, f: (typeof FIELDS)[number]): Set<number> {
  const out = new Set<number>();
  const bad = () =>
    new TypeError(`Invalid cron schedule: bad ${f.name} field ${JSON.stringify(text)}`);
  const num = (s: string) => {
    if (!/^\d+$/.test(s)) throw bad();
    const n = Number(s);
    if (n < f.min || n > f.max) throw bad();
    return n;
  };
  for (const part of text.split(",")) {
    const [range, stepText, extra] = part.split("/");
    if (extra !== undefined) throw bad();
    const step = stepText === undefined ? 1 : num(stepText);
    if (step === 0) throw bad();
    let lo: number;
    let hi: number;
    if (range === "*") [lo, hi] = [f.min, f.max];
    else if (range.includes("-")) {
      const [a, b] = range.split("-");
      [lo, hi] = [num(a), num(b)];
      if (lo > hi) throw bad();
    } else {
      lo = num(range);
      hi = stepText === undefined ? lo : f.max;
    }
    for (let v = lo; v <= hi; v += step) out.add(v);
  }
  // Sunday is 0 and 7.
  if (f.name === "day of week" && out.delete(7)) out.add(0);
  return out;
}

/** Parses a 5-field (or 6-field, seconds first) cron string; throws a `TypeError` naming the bad field. */
export function parseCron(source: string): Cron {
  if (typeof source !== "string") {
    throw new TypeError(`Invalid cron schedule: expected a string, got ${typeof source}`);
  }
  const parts = source.trim().split(/\s+/);
  if (parts.length !== 5 && parts.length !== 6) {
    throw new TypeError(
      `Invalid cron schedule: expected 5 fields (or 6 with seconds), got ${parts.length}: ${
        JSON.stringify(source)
      }`,
    );
  }
  const fields = parts.length === 6 ? parts : ["0", ...parts];
  const [seconds, minutes, hours, days, months, weekdays] = fields.map((t, i) =>
    parseField(t, FIELDS[i])
  );
  return {
    source: parts.join(" "),
    seconds,
    minutes,
    hours,
    days,
    months,
    weekdays,
    eitherDay: !fields[3].startsWith("*") && !fields[5].startsWith("*"),
  };
}

function expression(e: CronScheduleExpression | undefined, name: string): string {
  if (e === undefined) return "*";
  if (typeof e === "number") return String(e);
  if ("exact" in e) return Array.isArray(e.exact) ? e.exact.join(",") : String(e.exact);
  if ("start" in e || "end" in e || "every" in e) {
    const range = e.start === undefined && e.end === undefined
      ? "*"
      : `${e.start ?? (name === "dayOfMonth" || name === "month" ? 1 : 0)}${
        e.end === undefined ? "" : `-${e.end}`
      }`;
    return e.every === undefined ? range : `${range}/${e.every}`;
  }
  throw new TypeError(`Invalid cron schedule: bad ${name} ${JSON.stringify(e)}`);
}

/** Turns Deno.cron's object form into a cron string. */
export function scheduleToString(schedule: string | CronSchedule): string {
  if (typeof schedule === "string") return schedule;
  if (schedule === null || typeof schedule !== "object") {
    throw new TypeError(`Invalid cron schedule: got ${String(schedule)}`);
  }
  const s = schedule;
  return [
    expression(s.minute, "minute"),
    expression(s.hour, "hour"),
    expression(s.dayOfMonth, "dayOfMonth"),
    expression(s.month, "month"),
    expression(s.dayOfWeek, "dayOfWeek"),
  ].join(" ");
}

function dayMatches(c: Cron, d: Date): boolean {
  const dom = c.days.has(d.getUTCDate());
  const dow = c.weekdays.has(d.getUTCDay());
  return c.eitherDay ? dom || dow : dom && dow;
}

/**
 * The first time (ms, UTC) strictly after `after` that `cron` matches. Skips
 * whole months, days, hours and minutes that cannot match, so a yearly
 * schedule costs a few hundred steps, not a year of seconds.
 */
export function nextTick(cron: Cron, after: number): number {
  const d = new Date(Math.floor(after / 1000) * 1000 + 1000);
  // Five years covers every valid schedule (Feb 29 on a given weekday included).
  const limit = after + 5 * 366 * 24 * 3600 * 1000;
  while (d.getTime() <= limit) {
    if (!cron.months.has(d.getUTCMonth() + 1)) {
      d.setUTCMonth(d.getUTCMonth() + 1, 1);
      d.setUTCHours(0, 0, 0, 0);
    } else if (!dayMatches(cron, d)) {
      d.setUTCDate(d.getUTCDate() + 1);
      d.setUTCHours(0, 0, 0, 0);
    } else if (!cron.hours.has(d.getUTCHours())) {
      d.setUTCHours(d.getUTCHours() + 1, 0, 0, 0);
    } else if (!cron.minutes.has(d.getUTCMinutes())) {
      d.setUTCMinutes(d.getUTCMinutes() + 1, 0, 0);
    } else if (!cron.seconds.has(d.getUTCSeconds())) {
      d.setUTCSeconds(d.getUTCSeconds() + 1, 0);
    } else return d.getTime();
  }
  throw new TypeError(`Invalid cron schedule: ${JSON.stringify(cron.source)} never matches`);
}
