import { UsageError } from './errors.js';

const UNITS: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };

/** Parses sizes as qemu-img does: a number with an optional K/M/G/T/P/E suffix (powers of 1024). */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)(?:i?b)?\s*$/i.exec(text);
  if (!m) throw new UsageError(`Invalid ${what} '${text}': use a number with an optional K, M, G, T, P or E suffix`);
  const value = Number(m[1]) * (UNITS[(m[2] ?? '').toLowerCase()] ?? 1);
  if (!Number.isSafeInteger(Math.floor(value)) || value > 2 ** 63) {
    throw new UsageError(`Invalid ${what} '${text}': too large`);
  }
  return Math.floor(value);
}

/** Parses `-o key=value,key2=value2` (commas doubled to escape them, as qemu does); later -o win. */
export function parseOptionString(text: string, into: Record<string, string> = {}): Record<string, string> {
  const parts: string[] = [];
  let cur = '';
  for (let i = 0; i < text.length; i++) {
    const ch = text[i];
    if (ch === ',' && text[i + 1] === ',') {
      cur += ',';
      i++;
    } else if (ch === ',') {
      parts.push(cur);
      cur = '';
    } else cur += ch;
  }
  parts.push(cur);
  for (const part of parts) {
    if (part === '') continue;
    const eq = part.indexOf('=');
    if (eq < 0) into[part] = 'on';
    else into[part.slice(0, eq)] = part.slice(eq + 1);
  }
  return into;
}

/** Refuses options a driver does not know, naming the first, as qemu-img does. */
export function checkKnownOptions(format: string, given: Record<string, string>, known: readonly string[]): void {
  for (const key of Object.keys(given)) {
    if (!known.includes(key)) {
      throw new UsageError(`Invalid parameter '${key}' for format ${format} (known: ${known.join(', ') || 'none'})`);
    }
  }
}

export function parseBoolOption(value: string | undefined, name: string, fallback: boolean): boolean {
  if (value === undefined) return fallback;
  if (['on', 'true', 'yes', '1'].includes(value)) return true;
  if (['off', 'false', 'no', '0'].includes(value)) return false;
  throw new UsageError(`Invalid value '${value}' for option ${name}: use on or off`);
}

export function parseSizeOption(value: string | undefined, name: string, fallback: number): number {
  return value === undefined ? fallback : parseSize(value, name);
}
