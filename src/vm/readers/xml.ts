/** Small XML plumbing shared by the XML-based readers (vbox, libvirt). */
import { XMLParser, XMLValidator } from 'fast-xml-parser';
import { CorruptImageError } from '../../disk/errors.js';

// biome-ignore lint/suspicious/noExplicitAny: parsed XML is an untyped tree, read through the helpers below
export type XmlNode = Record<string, any>;

/** Parses `text`; elements are objects, attributes '@name', text '#text'. Bad XML is a typed error. */
export function parseXml(text: string, file: string, what: string): XmlNode {
  const valid = XMLValidator.validate(text);
  if (valid !== true) {
    throw new CorruptImageError(`not a valid ${what} (XML error at line ${valid.err.line}: ${valid.err.msg})`, file);
  }
  const parser = new XMLParser({
    ignoreAttributes: false,
    attributeNamePrefix: '@',
    parseTagValue: false,
    parseAttributeValue: false,
    trimValues: true,
    processEntities: true,
    removeNSPrefix: false,
  });
  return parser.parse(text) as XmlNode;
}

/** The child elements named `name` as an array (absent -> [], one -> [it]). */
export function children(node: XmlNode | undefined, name: string): XmlNode[] {
  if (!node || typeof node !== 'object') return [];
  const v = node[name];
  if (v === undefined || v === null) return [];
  const list = Array.isArray(v) ? v : [v];
  return list.map((x) => (typeof x === 'object' && x !== null ? x : { '#text': String(x) }));
}

/** The first child element named `name`. */
export function child(node: XmlNode | undefined, name: string): XmlNode | undefined {
  return children(node, name)[0];
}

export function attr(node: XmlNode | undefined, name: string): string | undefined {
  const v = node?.[`@${name}`];
  return v === undefined || v === null ? undefined : String(v);
}

export function text(node: XmlNode | undefined): string | undefined {
  if (node === undefined) return undefined;
  const v = node['#text'];
  return v === undefined || v === null ? undefined : String(v).trim();
}

/** Escapes text for an XML attribute or element. */
export function xmlEscape(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&apos;');
}

/** "0800277AA2FC" or "08-00-27-7a-a2-fc" -> "08:00:27:7a:a2:fc"; undefined when not a MAC. */
export function normalizeMac(raw: string | undefined): string | undefined {
  if (!raw) return undefined;
  const hex = raw.replace(/[^0-9a-fA-F]/g, '').toLowerCase();
  if (hex.length !== 12) return undefined;
  return hex.match(/../g)!.join(':');
}
