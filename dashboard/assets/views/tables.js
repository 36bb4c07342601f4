// PLACEHOLDER: to be written (issue 17).
import { h, mount, header } from '../lib/dom.js';

export default {
  id: 'tables',
  title: 'Table Editor',
  group: 'Database',
  render(ctx, el) {
    mount(el, header('Table Editor'), h('p', {}, 'Not built yet.'));
  },
};
