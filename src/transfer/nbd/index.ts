/**
 * NBD exports as vmferry sources: importing this module registers the nbd://, nbd+unix://,
 * nbd+tcp://, nbds:// and nbds+unix:// names with the disk plane's openImage.
 */
import { UsageError } from '../../disk/errors.js';
import { registerUriOpener } from '../../disk/registry.js';
import { NbdDiskReader } from './reader.js';

for (const scheme of ['nbd', 'nbd+unix', 'nbd+tcp', 'nbds', 'nbds+unix', 'nbds+tcp']) {
  registerUriOpener(scheme, async (uri, options) => {
    if (options.format && options.format !== 'raw') {
      throw new UsageError(
        `an NBD export is read as raw guest bytes (the server decodes the image); -f ${options.format} does not apply`,
        uri,
      );
    }
    return NbdDiskReader.open(uri);
  });
}

export { type BlockStatusDescriptor, NbdConnection } from './client.js';
export { BASE_ALLOCATION, NbdDiskReader, type NbdOpenOptions } from './reader.js';
export { isNbdUri, type NbdAddress, parseNbdUri } from './uri.js';
