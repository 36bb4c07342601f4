// PLACEHOLDER: to be written (issue 17).
import { h, mount, header } from '../lib/dom.js';

export default {
  id: 'sql',
  title: 'SQL Editor',
  group: 'Database',
  render(ctx, el) {
    mount(el, header('SQL Editor'), h('p', {}, 'Not built yet.'));
  },
};
