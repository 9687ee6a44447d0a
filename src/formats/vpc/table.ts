/**
 * A table of 32-bit entries (VHD BAT, VDI block map) read lazily in pages and kept under a
 * memory budget, so an image whose header claims a huge table costs nothing until it is used.
 */

import type { ByteSource } from '../../disk/source.js';
import { readExact } from '../../disk/source.js';

const PAGE_ENTRIES = 16384; // 64 KiB per page

export class PagedTable {
  private readonly pages = new Map<number, Uint32Array>();
  private readonly maxPages: number;

  constructor(
    private readonly source: ByteSource,
    /** Byte offset of entry 0 in the file. */
    private readonly offset: number,
    readonly length: number,
    private readonly littleEndian: boolean,
    private readonly what: string,
    budgetBytes: number,
  ) {
    this.maxPages = Math.max(4, Math.floor(budgetBytes / (PAGE_ENTRIES * 4)));
  }

  /** Entries [first, first + count) of the page holding `index`, loaded if needed. */
  async page(index: number): Promise<{ first: number; entries: Uint32Array }> {
    const p = Math.floor(index / PAGE_ENTRIES);
    let entries = this.pages.get(p);
    if (entries) {
      // Most recently used last.
      this.pages.delete(p);
      this.pages.set(p, entries);
    } else {
      const first = p * PAGE_ENTRIES;
      const count = Math.min(PAGE_ENTRIES, this.length - first);
      const raw = await readExact(this.source, this.offset + first * 4, count * 4, this.what);
      entries = new Uint32Array(count);
      for (let i = 0; i < count; i++) {
        entries[i] = this.littleEndian ? raw.readUInt32LE(i * 4) : raw.readUInt32BE(i * 4);
      }
      if (this.pages.size >= this.maxPages) {
        const oldest = this.pages.keys().next().value;
        if (oldest !== undefined) this.pages.delete(oldest);
      }
      this.pages.set(p, entries);
    }
    return { first: p * PAGE_ENTRIES, entries };
  }

  async get(index: number): Promise<number> {
    const { first, entries } = await this.page(index);
    return entries[index - first]!;
  }

  /** How many entries from `index` on (at most `max`, within one page) equal `value`. */
  async runOf(index: number, value: number, max: number): Promise<number> {
    const { first, entries } = await this.page(index);
    let n = 0;
    let i = index - first;
    while (n < max && i < entries.length && entries[i] === value) {
      n++;
      i++;
    }
    return n;
  }

  /** Visits every entry in order, a page at a time (check). */
  async forEach(visit: (index: number, value: number) => void): Promise<void> {
    for (let first = 0; first < this.length; first += PAGE_ENTRIES) {
      const { entries } = await this.page(first);
      for (let i = 0; i < entries.length; i++) visit(first + i, entries[i]!);
    }
  }
}
