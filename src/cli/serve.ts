import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { UsageError } from '../disk/errors.js';
import { parseSize } from '../disk/options.js';
import { startAgent } from '../transfer/agent.js';
import { certFingerprint, ensureCertificate, isLoopback, loadOrCreateToken } from '../transfer/security.js';
import { parse, positionals, stdout } from './common.js';

export const usage =
  'vmferry serve --listen HOST:PORT --root DIR [--token-file F] [--tls-cert F --tls-key F] [--insecure] [--max-transfers N] [--max-request-size SIZE] [--max-file-size SIZE] [--checkpoint-every SIZE] [--audit-log F]';

export function parseListen(text: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(text);
  if (!m) throw new UsageError(`--listen must be HOST:PORT (or [IPv6]:PORT), not '${text}'`);
  const port = Number(m[3]);
  if (port > 65535) throw new UsageError(`port ${port} is out of range`);
  return { host: (m[1] ?? m[2])!, port };
}

export async function serveCommand(args: string[]): Promise<number> {
  const { values, positionals: pos } = parse(
    args,
    {
      listen: { type: 'string' },
      root: { type: 'string' },
      'token-file': { type: 'string' },
      'tls-cert': { type: 'string' },
      'tls-key': { type: 'string' },
      insecure: { type: 'boolean' },
      'max-transfers': { type: 'string' },
      'max-request-size': { type: 'string' },
      'max-file-size': { type: 'string' },
      'checkpoint-every': { type: 'string' },
      'audit-log': { type: 'string' },
      debug: { type: 'boolean' },
    },
    usage,
  );
  positionals(pos, 0, usage, []);
  if (!values.listen || !values.root) throw new UsageError(`--listen and --root are required; usage: ${usage}`);
  const { host, port } = parseListen(values.listen);
  const root = values.root;
  if (!existsSync(root)) throw new UsageError('the root folder does not exist', root);
  if (values.insecure && !isLoopback(host))
    throw new UsageError(`--insecure (plain HTTP) is only allowed on a loopback address, not ${host}`);
  if (values.insecure && (values['tls-cert'] || values['tls-key']))
    throw new UsageError('--insecure and --tls-cert/--tls-key exclude each other');
  // The agent's own files live in a hidden folder under ROOT that no transfer name can reach.
  const stateDir = join(root, '.vmferry-agent');
  mkdirSync(stateDir, { recursive: true, mode: 0o700 });
  const tokenFile = values['token-file'] ?? join(stateDir, 'token');
  const { token, created } = loadOrCreateToken(tokenFile);
  const say = (line: string) => stdout().write(`${line}\n`);
  if (created) say(`generated a new token in ${tokenFile} (give it to senders with --token-file or VMFERRY_TOKEN)`);
  let tlsFiles: { cert: Buffer; key: Buffer } | undefined;
  if (!values.insecure) {
    const certPath = values['tls-cert'] ?? join(stateDir, 'cert.pem');
    const keyPath = values['tls-key'] ?? join(stateDir, 'key.pem');
    if ((values['tls-cert'] === undefined) !== (values['tls-key'] === undefined))
      throw new UsageError('give both --tls-cert and --tls-key');
    if (values['tls-cert'] === undefined) {
      const { generated } = ensureCertificate(certPath, keyPath, [host]);
      if (generated) say(`generated a self-signed certificate in ${certPath}`);
    }
    try {
      tlsFiles = { cert: readFileSync(certPath), key: readFileSync(keyPath) };
    } catch (err) {
      throw new UsageError(`cannot read the certificate or key: ${(err as Error).message}`);
    }
    say(`certificate fingerprint (SHA-256): ${certFingerprint(tlsFiles.cert)}`);
  }
  const agent = await startAgent({
    host,
    port,
    root,
    token,
    tls: tlsFiles,
    maxTransfers: values['max-transfers'] ? Number(values['max-transfers']) : undefined,
    maxRequestBytes: values['max-request-size'] ? parseSize(values['max-request-size'], 'request size') : undefined,
    maxFileSize: values['max-file-size'] ? parseSize(values['max-file-size'], 'file size limit') : undefined,
    checkpointBytes: values['checkpoint-every'] ? parseSize(values['checkpoint-every'], 'checkpoint interval') : undefined,
    auditLog: values['audit-log'],
    log: (line) => process.stderr.write(`vmferry serve: ${line}\n`),
  });
  say(`listening on ${agent.url} (root ${root}, audit log ${agent.auditPath})`);
  // Stop cleanly: checkpoint what is in flight instead of deleting the partial images, so a send resumes.
  await new Promise<void>((resolve) => {
    const stop = (signal: NodeJS.Signals) => {
      process.stderr.write(`vmferry serve: ${signal}: checkpointing transfers in progress and stopping\n`);
      agent.close().then(resolve, resolve);
    };
    process.removeAllListeners('SIGINT');
    process.removeAllListeners('SIGTERM');
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
  return 0;
}
